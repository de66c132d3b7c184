"""The unit files and server configs of a deployment (data read by ``dlora deploy install``)."""
