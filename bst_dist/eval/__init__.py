"""Evaluation: streamed with the cache carried and at length T (`evaluators`), of a run
directory's checkpoint (`run`), and as a hook during training (`hook`)."""
