"""Parameter counts of the jobs/ files are what their `# params:` headers say (counted from
shapes with nnx.eval_shape: the 400M model is never allocated). The header is on the jobs that
set a model, jobs/*.yaml; a TPU variant takes its model from the GPU job it includes
(test_jobs_files.py checks that it changes nothing but the placement)."""

import glob
import os

from ops.job_params import main

from tests.helpers.paths import JOBS



def test_every_job_header_matches_the_counted_parameters(capsys):
    jobs = sorted(glob.glob(os.path.join(JOBS, "*.yaml")))
    assert len(jobs) >= 10
    assert main(jobs) == 0, capsys.readouterr().out
