"""An image's size from its file header alone (no decode), in the orientation the reader shows it.

For COCO jsons whose image entries lack ``width``/``height`` (some converters omit them): the
dataset reads each size here instead of decoding every picture. JPEG (the SOF segment), PNG
(IHDR) and BMP (the info header) are read; a JPEG's EXIF orientation 5-8 swaps the size exactly
as :func:`~ppdet_retina.data.transforms.decode_image` turns the pixels (it reads EXIF from JPEG
files only, so PNG and BMP sizes are taken as stored).
"""

from __future__ import annotations

from typing import BinaryIO, Tuple

from ppdet_retina.data.transforms import _tiff_orientation

__all__ = ["HeaderError", "header_size"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers of every JPEG coding process; C4 (DHT), C8 (reserved) and CC (DAC) are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# EXIF orientations that turn the picture a quarter (with or without a mirror): height and width swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class HeaderError(ValueError):
    """The file's header gives no size: not a JPEG, PNG or BMP, or a header cut short or malformed."""


def header_size(path: str) -> Tuple[int, int]:
    """(height, width) of the image at ``path`` as decoded by the reader (EXIF orientation applied).

    Reads only the header bytes. Raises HeaderError saying why when the header gives no size, or
    OSError when the file cannot be opened.
    """
    with open(path, "rb") as f:
        head = f.read(32)
        if head[:3] == b"\xff\xd8\xff":
            return _jpeg_size(f)
        if head[:8] == _PNG_SIGNATURE:
            return _png_size(head)
        if head[:2] == b"BM":
            return _bmp_size(head)
    raise HeaderError("not a JPEG, PNG or BMP file (only those headers are read)")


def _jpeg_size(f: BinaryIO) -> Tuple[int, int]:
    """Walks the header segments the way transforms._jpeg_segments does, up to the first scan, so
    that the EXIF segment found is the one the decoder applies."""
    pos, hw, orientation = 2, None, None
    while True:
        f.seek(pos)
        head = f.read(4)
        if len(head) < 4 or head[0] != 0xFF:
            break
        marker = head[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            break
        length = int.from_bytes(head[2:4], "big")
        if hw is None and marker in _JPEG_SOF:
            frame = f.read(5)  # precision, height, width
            if len(frame) == 5:
                hw = (int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big"))
        elif orientation is None and marker == 0xE1:
            payload = f.read(max(length - 2, 0))
            if payload[:6] == b"Exif\x00\x00":
                orientation = _tiff_orientation(payload[6:])
        pos += 2 + length
    if hw is None:
        raise HeaderError("its JPEG header has no frame size (the header is cut short or malformed)")
    if not all(hw):
        raise HeaderError(f"its JPEG header gives a size of {hw[0]}x{hw[1]}")
    return (hw[1], hw[0]) if orientation in _SWAPPING_ORIENTATIONS else hw


def _png_size(head: bytes) -> Tuple[int, int]:
    # The first chunk is IHDR: length (4), type (4), width (4), height (4), big-endian.
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise HeaderError("its PNG header has no IHDR chunk first (the file is cut short or malformed)")
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return _positive(h, w, "PNG")


def _bmp_size(head: bytes) -> Tuple[int, int]:
    info = int.from_bytes(head[14:18], "little") if len(head) >= 18 else 0
    if info == 12 and len(head) >= 22:  # OS/2 core header: unsigned 16-bit sizes
        w, h = int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little")
    elif info >= 40 and len(head) >= 26:
        # A negative height marks rows stored top-down; the picture is as tall either way.
        w = int.from_bytes(head[18:22], "little", signed=True)
        h = abs(int.from_bytes(head[22:26], "little", signed=True))
    else:
        raise HeaderError(f"its BMP header is cut short or of an unknown kind (info header size {info})")
    return _positive(h, w, "BMP")


def _positive(h: int, w: int, kind: str) -> Tuple[int, int]:
    if h <= 0 or w <= 0:
        raise HeaderError(f"its {kind} header gives a size of {h}x{w}")
    return h, w

