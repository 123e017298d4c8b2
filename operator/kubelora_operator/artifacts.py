"""Reading what the trainer publishes under spec.output.uri: status/progress.json while it runs,
manifest.json when it is done. Failures to read are not fatal: the status says so and the next
sync tries again."""
from __future__ import annotations

import json
from typing import Optional

from kubelora_trainer import storage
from kubelora_trainer.progress import PROGRESS_KEY  # noqa: F401 - re-exported for the handlers

MANIFEST_KEY = "manifest.json"


def read_json(output_uri: str, key: str, settings: storage.S3Settings) -> Optional[dict]:
    loc = storage.parse_uri(output_uri).child(key)
    try:
        if loc.is_s3:
            client = storage.make_client(settings)
            body = client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        else:
            with open(loc.key, "rb") as f:
                body = f.read()
        return json.loads(body)
    except Exception:  # noqa: BLE001 - absent or unreadable: not there yet
        return None
