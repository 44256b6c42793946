"""Datasets as WebDataset tar shards: `python -m salnet.shards pack|verify|info|synth`.

A shard directory is `NAME-000000.tar, NAME-000001.tar, ...` plus `manifest.json`, written last.
Each sample is three consecutive tar members sharing a key (no dots, no path separators):

    KEY.jpg or KEY.png   the image, 8-bit RGB
    KEY.mask.png         the mask, 8-bit single channel (soft values kept)
    KEY.json             {"key", "dataset", "source", "mask_source", "orig_size": [H, W], "stored_size": [H, W]}

Modules: layouts (find image/mask pairs), images (convert and check by documented rules), jpeg
(check a JPEG without decoding it), writer (shards, then the manifest, atomically), pack, verify,
info, synth (the built-in demo set), parallel (ordered process pool), manifest (the format and
`load_manifest`, the one way readers open a shard directory).
"""
