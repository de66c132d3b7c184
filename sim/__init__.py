"""The cluster simulator (issue 21): the real scheduling, dispatch and migration cores run against
a cost model of the engine instead of the model."""
