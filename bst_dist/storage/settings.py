"""Object-storage endpoint and credentials: one setting, applied to every client in the process.

The setting is the environment, as each client already reads it:

* `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (a GCS emulator, or any GCS-compatible
  endpoint): gcsfs and google-cloud-storage read it themselves; `configure()` derives what
  tensorstore (Orbax's array writer) needs for the same endpoint: `TENSORSTORE_GCS_HTTP_URL`
  (its gcs driver's base URL) and a placeholder `GOOGLE_AUTH_TOKEN_FOR_TESTING` (an emulator
  takes no credentials; without one tensorstore probes the GCE metadata server), and turns off
  gcsfs's bucket-type probe (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: it asks the Storage
  Control gRPC API, which an emulator lacks, and waits 60 s per bucket for it).
* Real GCS: nothing to set; both clients use Application Default Credentials (a VM's or pod's
  service account, `gcloud auth application-default login`).
* S3 and S3-compatible stores: `AWS_ENDPOINT_URL` and the usual AWS_* credentials, which s3fs
  and tensorstore's s3 driver both read; nothing to derive (s3fs must be installed).

Tensorstore and gcsfs read these when they first open a store, so `configure()` runs when this
package is imported (before any checkpoint or file is opened) and values already set win.
`worker_env()` is what a launcher forwards to processes that do not inherit this environment
(Ray workers inherit the raylet's, not the driver's).
"""

from __future__ import annotations

import os

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# Variables that select the endpoint or credentials; forwarded to Ray workers when set here.
FORWARDED = (EMULATOR_ENV, "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "GOOGLE_APPLICATION_CREDENTIALS", "AWS_ENDPOINT_URL")


def derived(env: dict) -> dict[str, str]:
    """What the emulator setting implies for the other clients (empty without one)."""
    host = env.get(EMULATOR_ENV)
    if not host:
        return {}
    url = host if "://" in host else f"http://{host}"
    return {"TENSORSTORE_GCS_HTTP_URL": url.rstrip("/"), "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def configure(env=None) -> None:
    """Apply the derived settings to `env` (default os.environ), keeping values already set."""
    env = os.environ if env is None else env
    for k, v in derived(env).items():
        env.setdefault(k, v)


def worker_env() -> dict[str, str]:
    configure()
    return {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
