"""Fetching the 10 Monkey Species dataset from Kaggle into the default data folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from monkeytrain.errors import UserError

KAGGLE_DATASET = "slothkong/10-monkey-species"


def download_monkey_species(destination: Path) -> Path:
    """Download with kagglehub (it caches) and copy the Kaggle layout to `destination`."""
    if destination.exists() and any(destination.iterdir()):
        raise UserError(f"{destination} already exists and is not empty; remove it or pass another --dest.")
    try:
        import kagglehub

        fetched = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as error:  # kagglehub raises network, auth and HTTP errors of many types
        raise UserError(
            f"could not download {KAGGLE_DATASET} from Kaggle ({error.__class__.__name__}); check the "
            "network and Kaggle credentials, or download it by hand and pass --data ROOT."
        ) from None
    shutil.copytree(fetched, destination, dirs_exist_ok=True)
    return destination
