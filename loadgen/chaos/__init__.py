"""``make chaos`` and ``make soak``: the stack as separate processes, under streaming load through
the gateway, while its servers and services are killed, restarted and stalled one at a time
(``faults``); every request's outcome, every chunk the workers published (``tap``) and the cluster's
state afterwards are checked and reported per fault (``report``)."""
