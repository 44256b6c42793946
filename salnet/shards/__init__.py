"""Datasets as WebDataset tar shards: `python -m salnet.shards pack|verify|info|synth`.

A shard directory is `NAME-000000.tar, NAME-000001.tar, ...` plus `manifest.json`, written last.
Each sample is three consecutive tar members sharing a key: KEY.jpg or KEY.png (the image),
KEY.mask.png (the mask) and KEY.json (where it came from, its sizes); `format` defines them.

Modules: format (the sample format: member names, how a name splits, KEY.json), layouts (find
image/mask pairs), images (convert and check by documented rules, after salnet.imagecheck has
checked the pixel count from the header), jpeg (check a JPEG without decoding it), writer
(shards, then the manifest, atomically), tario (read a shard's tar without trusting it: plain
tar only, no member above a size limit), pack, verify, info, synth (the built-in demo set),
parallel (ordered process pool; the CPU count), manifest (the directory's format, what every
manifest must satisfy, and `load_manifest`, the one way readers open a shard directory).
"""
