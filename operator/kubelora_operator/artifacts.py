"""Reading what the trainer publishes under spec.output.uri: status/progress.json while it runs,
manifest.json when it is done, with the job's own credentials (its Secret) when it names one.
An object that is not there yet is not an error; anything else (access denied, no bucket) is
returned so the status can say it once it has lasted."""
from __future__ import annotations

import json
from typing import Optional

from kubelora_trainer import storage
from kubelora_trainer.progress import PROGRESS_KEY  # noqa: F401 - re-exported for the handlers

MANIFEST_KEY = "manifest.json"
_clients: dict[tuple, object] = {}   # one boto3 client per (endpoint, region, style, keys): ~45 ms each to make


def client_for(settings: storage.S3Settings):
    """The cached client for these settings. Without a job's own keys the client takes the
    operator's mounted Secret files, read again on each call (three small files) so that a
    rotated Secret makes a new client instead of failing every job with the old keys."""
    own = (settings.access_key, settings.secret_key)
    files = () if all(own) else tuple(sorted(storage.secret_file_credentials().items()))
    key = (settings.endpoint, settings.region, settings.addressing_style, *own, files)
    if key not in _clients:
        _clients[key] = storage.make_client(settings)
    return _clients[key]


def read_json(output_uri: str, key: str, settings: storage.S3Settings) -> tuple[Optional[dict], Optional[str]]:
    """(the object, None), (None, None) when it is not there yet, or (None, the error)."""
    loc = storage.parse_uri(output_uri).child(key)
    try:
        if loc.is_s3:
            body = client_for(settings).get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        else:
            with open(loc.key, "rb") as f:
                body = f.read()
        return json.loads(body), None
    except FileNotFoundError:
        return None, None
    except ValueError as e:
        return None, f"reading {loc}: not JSON ({e})"
    except Exception as e:  # noqa: BLE001 - classified: a missing key is "not yet", the rest is an error
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return None, None
        return None, str(storage.describe_error(e, loc, "reading"))
