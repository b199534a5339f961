# The image every node of a bst_dist Ray cluster runs (KubeRay pods, and the `docker:` section of
# the launcher YAMLs in cluster/): Python 3.11, Ray 2.60, the project's dependencies pinned by
# constraints.txt, the project itself (so `bst-dist` is on PATH and the job files are under
# /app/jobs), and google-api-python-client, which Ray's GCP autoscaler on the head needs to
# create worker VMs. A job submitted with `--working-dir .` still runs the code it uploads: Ray
# puts the working dir first on PYTHONPATH, ahead of this installed copy.
#
#   docker build --build-arg EXTRA=gpu -t REGISTRY/bst-dist:gpu .
#   docker build --build-arg EXTRA=tpu -t REGISTRY/bst-dist:tpu .
#
# Build from the project root. .dockerignore keeps .venv/, runs/ and .git out of the context,
# so they never reach a layer.
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}
ARG EXTRA=gpu
WORKDIR /app
COPY --chown=ray:users constraints.txt /app/constraints.txt
COPY --chown=ray:users . /app
RUN python -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
 && pip install --no-cache-dir -c /app/constraints.txt "/app[${EXTRA},gcp]" \
 && bst-dist --help > /dev/null
ENV TIKTOKEN_CACHE_DIR=/home/ray/.cache/tiktoken \
    RAY_JOB_STOP_WAIT_TIME_S=60
