"""The contract every dlora process shares: wire messages, subjects, settings, state, logging."""
