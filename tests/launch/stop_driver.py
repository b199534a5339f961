"""A job's driver for tests/launch/test_launch_ray.py's stop test: the real `launch.train` on the
cluster the job runs on, 2 CPU workers, with a training function that marks each reported step
in the run dir (so the test knows when to stop the job) and slows each step down (so the stop
lands mid-run).

    python tests/launch/stop_driver.py JOB.yaml '["override", ...]'
"""

import json
import os
import sys
import time

from bst_dist import config, launch


def marked_slow_train(cfg, *, report, stop=None):
    from bst_dist.train.loop import train

    def report_and_mark(metrics):
        report(metrics)
        open(os.path.join(cfg.train.run_dir, f"reported-{metrics['step']}"), "w").close()
        time.sleep(0.5)

    return train(cfg, report=report_and_mark, stop=stop)


if __name__ == "__main__":
    cfg = config.load(sys.argv[1], json.loads(sys.argv[2]))
    launch.train(cfg, workers=2, train_fn=marked_slow_train)
