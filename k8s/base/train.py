"""Example trainer: read every file under DATA_DIR through a PyTorch DataLoader, EPOCHS times,
in a new shuffled order each epoch, and print files/s and MB/s per epoch.

Stands in for a real training loop: with cachefs the first epoch is bound by the bucket (or by the
prefetch), the following ones by the local cache.
"""

import os
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

DATA_DIR = os.environ.get("DATA_DIR", "/mnt/cachefs/data")
EPOCHS = int(os.environ.get("EPOCHS", "2"))
WORKERS = int(os.environ.get("WORKERS", "8"))


class Files(Dataset):
    def __init__(self, root):
        self.paths = sorted(
            os.path.join(d, name) for d, _, names in os.walk(root) for name in names
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return len(f.read())


def main():
    t0 = time.monotonic()
    files = Files(DATA_DIR)
    print(f"listed {len(files)} files under {DATA_DIR} in {time.monotonic() - t0:.1f} s", flush=True)
    if not len(files):
        sys.exit(f"no files under {DATA_DIR}")
    loader = DataLoader(files, batch_size=64, shuffle=True, num_workers=WORKERS,
                        collate_fn=lambda sizes: sum(sizes))
    for epoch in range(EPOCHS):
        t0 = time.monotonic()
        nbytes = sum(loader)
        dt = time.monotonic() - t0
        print(f"epoch {epoch}: {len(files) / dt:.0f} files/s, {nbytes / dt / 1e6:.1f} MB/s",
              flush=True)


if __name__ == "__main__":
    torch.multiprocessing.set_start_method("fork")
    main()
