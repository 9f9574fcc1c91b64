"""Any image folder: labels from parent folders, domains from the levels above, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from device_sdk.errors import InputError
from device_sdk.imagefolder import load_image, scan_image_folder


def _png(path, size=(32, 32), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def test_labels_domains_and_ignored_files(tmp_path):
    _png(tmp_path / "siteA" / "cam1" / "cat" / "1.png")
    _png(tmp_path / "dog" / "2.jpg")
    _png(tmp_path / "loose.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    _png(tmp_path / ".hidden" / "x" / "3.png")
    items = {(it.label, it.domain) for it in scan_image_folder(tmp_path)}
    assert items == {("cat", "siteA/cam1"), ("dog", ""), ("", "")}


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(InputError, match="no images found"):
        scan_image_folder(tmp_path)
    with pytest.raises(InputError, match="not found"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "one.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="one.jpg is a file, not an image folder"):
        scan_image_folder(tmp_path / "one.jpg")


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "x" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        load_image(str(bad), (32, 32))


def test_modes_are_converted_and_sizes_resized_unless_strict(tmp_path):
    _png(tmp_path / "g.png", size=(40, 20), mode="L")
    _png(tmp_path / "a.png", mode="RGBA")
    assert load_image(str(tmp_path / "g.png"), (32, 32)).shape == (32, 32, 3)
    assert load_image(str(tmp_path / "a.png"), (32, 32)).dtype == np.uint8
    with pytest.raises(InputError, match="40x20"):
        load_image(str(tmp_path / "g.png"), (32, 32), strict=True)


def test_web_and_phone_extensions_are_scanned(tmp_path):
    """Browsers save JPEGs as .jfif, some tools as .jpe; AVIF is common on the web (Pillow reads it)."""
    from PIL import features

    picture = Image.fromarray(np.full((12, 16, 3), 90, np.uint8))
    picture.save(tmp_path / "saved.jfif", "JPEG")
    picture.save(tmp_path / "old.JPE", "JPEG")
    names = {"saved.jfif", "old.JPE"}
    if features.check("avif"):
        picture.save(tmp_path / "web.avif", "AVIF")
        names.add("web.avif")
    items = scan_image_folder(tmp_path)
    assert {it.path.rsplit("/", 1)[-1] for it in items} == names
    for it in items:
        assert abs(int(load_image(it.path, (8, 8)).mean()) - 90) <= 3
