"""The sample format module: member names split back into what built them, and the loader reads
every image extension that pack writes."""

from salnet.shards import format as fmt
from salnet.shards.writer import Sample


def test_member_names_split_at_the_first_dot():
    for ext in (*fmt.IMAGE_EXTS, fmt.MASK_EXT, fmt.META_EXT):
        assert fmt.split_member_name(fmt.member_name("s_001-a", ext)) == ("s_001-a", ext)
    assert fmt.split_member_name("s001.mask.png") == ("s001", "mask.png")
    assert fmt.split_member_name("README") == ("README", "")


def test_the_loader_reads_every_image_extension_pack_writes():
    assert set(fmt.IMAGE_EXTS) <= set(fmt.READABLE_IMAGE_EXTS)
    assert set(fmt.READABLE_IMAGE_EXTS.values()) == {"jpeg", "png"}


def test_a_written_sample_is_image_mask_meta_under_one_key():
    meta = fmt.sample_meta(
        key="k", dataset="d", source="a.jpg", mask_source="a.png", orig_size=(4, 6), stored_size=(2, 3)
    )
    assert meta["orig_size"] == [4, 6] and meta["stored_size"] == [2, 3]
    sample = Sample(key="k", image_ext=fmt.JPEG_EXT, image=b"i", mask=b"m", meta=meta, foreground=0.0, soft_mask=False)
    assert [fmt.split_member_name(name) for name, _ in sample.members()] == [
        ("k", "jpg"),
        ("k", "mask.png"),
        ("k", "json"),
    ]
