"""Contact sheets of near-duplicate candidate pairs, to choose and check the grouping rule of dataset.py, and
leak-free validation sets for models trained on an older split.

    python near_duplicates.py --data_dir ../shared/data/BUSI                 # pairs around the thresholds
    python near_duplicates.py --data_dir data/BUSI --phash_lo 0 --phash_hi 4 # the clear cases
    python near_duplicates.py --data_dir data/BUSI --trained_on checkpoints/busi_split.json \
        --new_split checkpoints/busi_split_grouped.json --out_split checkpoints/busi_split_leakfree_old.json

Every pair of images whose DCT-hash distance lies in [phash_lo, phash_hi] is drawn side by side with both
Hamming distances and whether dataset.py's rule (NEAR_DUP_PHASH_MAX and NEAR_DUP_DHASH_MAX) calls them the
same scan. The sheets hold image pixels: they go to a git-ignored folder (private/ by default).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import dataset

log = logging.getLogger("near_duplicates")

# ---- settings (edit here, or override on the command line: --phash_hi 16)
data_dir = "data/BUSI"                  # BUSI class folders
manifest = ""                           # or: a manifest CSV
out_dir = "private/near_duplicates"     # contact sheets go here (git-ignored: they hold image pixels)
phash_lo = 7                            # smallest DCT-hash distance of the pairs drawn
phash_hi = 14                           # largest DCT-hash distance of the pairs drawn
pairs_per_sheet = 12                    # pairs per PNG
thumb = 160                             # thumbnail height in pixels
trained_on = ""                         # a split a model was trained on: write a leak-free validation set for it ...
new_split = ""                          # ... the validation images of this (grouped) split ...
out_split = ""                          # ... that have no near-duplicate among trained_on's training images, as a split file here
# ---- end of settings


def candidate_pairs(phashes: list[tuple], lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """(i, j, phash distance, dhash distance) of the pairs with lo <= phash distance <= hi, closest first."""
    dp, dd = dataset.hash_distances(phashes)
    i, j = np.nonzero(np.triu((dp >= lo) & (dp <= hi), k=1))
    rows = [(int(a), int(b), int(dp[a, b]), int(dd[a, b])) for a, b in zip(i, j)]
    return sorted(rows, key=lambda r: (r[2], r[3], r[0], r[1]))


def _thumb(grey: np.ndarray, h: int) -> Image.Image:
    w = max(1, round(grey.shape[1] * h / grey.shape[0]))
    return Image.fromarray(grey).resize((w, h), Image.BILINEAR).convert("RGB")


def draw_sheet(pairs, samples, h: int) -> Image.Image:
    """One row per pair: the two images and a caption with the distances and the rule's verdict."""
    rows = []
    for i, j, p, d in pairs:
        a, b = _thumb(dataset.load_image(samples[i].image), h), _thumb(dataset.load_image(samples[j].image), h)
        row = Image.new("RGB", (a.width + b.width + 10, h + 18), (255, 255, 255))
        row.paste(a, (0, 18)); row.paste(b, (a.width + 10, 18))
        same = p <= dataset.NEAR_DUP_PHASH_MAX and d <= dataset.NEAR_DUP_DHASH_MAX
        ImageDraw.Draw(row).text((2, 2), f"phash {p} dhash {d} {'SAME' if same else 'different'}: "
                                         f"{samples[i].key} | {samples[j].key}", fill=(200, 0, 0) if same else (0, 0, 0))
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y)); y += r.height + 4
    return sheet


def leak_free_split(samples, phashes, trained_on: dict, new_split: dict) -> dict:
    """A split file whose validation images are new_split's, less every image that is (or has) a near-duplicate
    among trained_on's training images; its training list is trained_on's (so evaluate.py scores the rest)."""
    index = {s.key: i for i, s in enumerate(samples)}
    seen = {index[k] for k in trained_on["train"] if k in index}
    pairs = dataset.near_duplicate_pairs(phashes)
    leaked = {j for i, j in pairs if i in seen} | {i for i, j in pairs if j in seen}
    val = [k for k in new_split["val"] if k in index and index[k] not in leaked and index[k] not in seen]
    return {"version": 2, "seed": new_split.get("seed"), "train": sorted(trained_on["train"]), "val": sorted(val),
            "leak_free": {"validation_of": "new_split", "left_out": len(new_split["val"]) - len(val),
                          "rule": dataset.NEAR_DUP_METHOD, "phash_max": dataset.NEAR_DUP_PHASH_MAX,
                          "dhash_max": dataset.NEAR_DUP_DHASH_MAX}}


def main(argv: list[str] | None = None) -> int:
    from cli import parse_settings
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_settings(__file__, argv, __doc__)
    samples = dataset.discover(cfg["data_dir"], manifest=cfg["manifest"])
    phashes = [dataset.image_hashes(dataset.load_image(s.image)) for s in samples]
    if cfg["trained_on"]:
        split = leak_free_split(samples, phashes, dataset.read_split(cfg["trained_on"]),
                                dataset.read_split(cfg["new_split"]))
        split["leak_free"].update(trained_on=cfg["trained_on"], new_split=cfg["new_split"])
        dataset.save_json_atomic(cfg["out_split"], split)
        print(f"{cfg['out_split']}: {len(split['val'])} validation images of {cfg['new_split']} with no near-duplicate "
              f"among the {len(split['train'])} training images of {cfg['trained_on']} "
              f"({split['leak_free']['left_out']} left out)")
        return 0
    pairs = candidate_pairs(phashes, cfg["phash_lo"], cfg["phash_hi"])
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    n = cfg["pairs_per_sheet"]
    for k in range(0, len(pairs), n):
        draw_sheet(pairs[k:k + n], samples, cfg["thumb"]).save(out / f"pairs_{k // n:03d}.png")
    print(f"{len(pairs)} pairs with phash distance {cfg['phash_lo']}..{cfg['phash_hi']}: "
          f"{(len(pairs) + n - 1) // n} sheet(s) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
