"""Working with jobs and run directories: the run files (`files`), the default training job with
its evaluation and plot hooks (`job`), describe, inspect and plot."""
