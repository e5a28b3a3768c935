"""Image files: which ones count, and one decode for training, evaluation, predict and export.

Every path from an encoded image file to the pixels a model sees goes through
`decode` (and `decode_and_resize`): the folder source's tf.data pipeline,
`launch.evaluate`, `launch.predict` and the exported SavedModel's
`serving_default` signature, which runs the same ops in-graph. They are plain
TensorFlow ops, so the SavedModel needs no Python to reproduce training. Two
things happen on decode besides the format's own decoding:

  * EXIF orientation. Cameras and phones store a photo as the sensor saw it and
    record in an EXIF tag (0x0112) how to turn it upright; TensorFlow's decoders
    ignore the tag. `decode` reads it from JPEG files (in-graph, see
    `exif_orientation`) and transposes the image as PIL's
    `ImageOps.exif_transpose` does. Orientation tags in PNG or WebP files (rare,
    not written by cameras) are not read.
  * Giant JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg's scaled IDCT
    (`tf.io.decode_jpeg(ratio=...)`), choosing the smallest scale that keeps the
    shorter side at least `max(MIN_DECODED_SIDE, 4 * size)`: a 108-Mpx photo then
    needs ~5 MB instead of 324 MB (1.3 GB as floats for the resize). Images with
    a shorter side below `2 * max(MIN_DECODED_SIDE, 4 * size)` (every image of
    the shared ants/bees and CIFAR-10 data at the default sizes) decode at full
    scale, exactly as `tf.io.decode_image` does.
"""

from __future__ import annotations

import re

import tensorflow as tf

# A decoded side is kept at least this long (or 4x the model input, if larger).
MIN_DECODED_SIDE = 1024

# The EXIF segment must start within this many bytes of the file, and its
# orientation entry must lie within them: it is the first segment (the EXIF
# standard) or follows a JFIF APP0 and perhaps another APPn, and IFD0 comes first.
_EXIF_SEARCH_BYTES = 1 << 16
_MAX_SEGMENTS = 4  # APPn/COM segments from the start looked at for EXIF
_MAX_IFD_ENTRIES = 64  # IFD0 entries examined for the orientation tag
_ORIENTATION_TAG = 0x0112


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8) of JPEG bytes; 1 when absent, invalid or not a JPEG.

    Looks at the first `_MAX_SEGMENTS` APPn/COM segments after the JPEG's
    start-of-image marker for an `APP1 "Exif"` one, then reads its TIFF header's
    byte order and IFD0's entries for tag 0x0112, all in-graph, so that the
    exported SavedModel does it too. Every offset is bounds-checked against the
    bytes read, so a malformed tag yields 1, never an error.

    Args:
      data: scalar tf.string, the encoded image.

    Returns:
      Scalar int32 in [1, 8].
    """
    return tf.cond(_may_have_exif(data), lambda: _find_exif_orientation(data), lambda: tf.constant(1, tf.int32))


def _may_have_exif(data: tf.Tensor) -> tf.Tensor:
    """False for a JPEG whose JFIF APP0 is followed by no other APPn segment: no EXIF.

    That is how most JPEGs without EXIF start (what PIL, scanners and datasets
    such as CIFAR write); ruling them out with a few scalar ops keeps the walk in
    `_find_exif_orientation`, which doubled the decode time of a 32x32 JPEG, off
    their path.
    """
    def u16_at(pos):  # big-endian, 0 past the end
        pos = tf.minimum(pos, tf.strings.length(data))
        pair = tf.io.decode_raw(tf.strings.substr(data, pos, 2), tf.uint16, little_endian=False, fixed_length=2)
        return tf.cast(pair[0], tf.int32)

    app0 = tf.equal(tf.strings.substr(data, 0, 4), b"\xff\xd8\xff\xe0")
    marker = u16_at(4 + u16_at(4))
    return ~app0 | ((marker >= 0xFFE0) & (marker <= 0xFFEF))


def _find_exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """`exif_orientation` past the fast path: walks the first APPn segments to EXIF's."""
    head = tf.io.decode_raw(tf.strings.substr(data, 0, _EXIF_SEARCH_BYTES), tf.uint8)
    n = tf.size(head, out_type=tf.int64)
    # Zero padding lets every gather read past the end; reads past `n` are rejected
    # by the bounds checks instead.
    padded = tf.concat([head, tf.zeros([16], tf.uint8)], 0)

    def read(i):
        return tf.cast(tf.gather(padded, tf.clip_by_value(tf.cast(i, tf.int64), 0, n + 15)), tf.int64)

    # Unrolled, not a tf.while_loop: the loop's per-iteration overhead alone tripled
    # the decode time of a 32x32 JPEG.
    exif_header = tf.constant([0xFF, 0xE1, 0, 0, 0x45, 0x78, 0x69, 0x66, 0, 0], tf.int64)  # APP1 .. "Exif\0\0"
    compare = tf.constant([True, True, False, False] + [True] * 6)  # bytes 2-3: the length
    pos = tf.constant(2, tf.int64)
    tiff = tf.constant(-1, tf.int64)
    alive = tf.equal(read(0), 0xFF) & tf.equal(read(1), 0xD8)  # start of image
    for _ in range(_MAX_SEGMENTS):
        seg = read(pos + tf.range(10, dtype=tf.int64))
        found = alive & (pos + 10 <= n) & tf.reduce_all(tf.equal(seg, exif_header) | ~compare)
        tiff = tf.where(found, pos + 10, tiff)
        skippable = tf.equal(seg[0], 0xFF) & (((seg[1] >= 0xE0) & (seg[1] <= 0xEF)) | tf.equal(seg[1], 0xFE))
        alive = alive & ~found & skippable
        pos = pos + 2 + seg[2] * 256 + seg[3]
    return tf.cond(tiff >= 0, lambda: _tiff_orientation(read, n, tiff), lambda: tf.constant(1, tf.int32))


def _tiff_orientation(read, n: tf.Tensor, tiff: tf.Tensor) -> tf.Tensor:
    """Tag 0x0112 of IFD0 of the TIFF structure at byte `tiff` (EXIF's payload); 1 if none or invalid."""
    little = tf.equal(read(tiff), 0x49) & tf.equal(read(tiff + 1), 0x49)  # "II"
    big = tf.equal(read(tiff), 0x4D) & tf.equal(read(tiff + 1), 0x4D)  # "MM"

    def u16(off):
        lo, hi = read(tiff + off), read(tiff + off + 1)
        return tf.where(little, lo + 256 * hi, 256 * lo + hi)

    def u32(off):
        return tf.where(little, u16(off) + 65536 * u16(off + 2), 65536 * u16(off) + u16(off + 2))

    ifd = u32(4)
    count = tf.minimum(u16(ifd), _MAX_IFD_ENTRIES)
    k = tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64)
    entry = ifd + 2 + 12 * k
    # A SHORT value sits in the first two bytes of the entry's 4-byte value field.
    hit = (k < count) & tf.equal(u16(entry), _ORIENTATION_TAG) & (tiff + entry + 10 <= n)
    value = tf.reduce_max(tf.where(hit, u16(entry + 8), tf.zeros_like(entry)))
    ok = (little | big) & (value >= 1) & (value <= 8)
    return tf.cast(tf.where(ok, value, 1), tf.int32)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turns a [h, w, c] image upright for its EXIF orientation, as `PIL.ImageOps.exif_transpose`."""
    def transpose(x):
        # Not tf.transpose: on CPUs without oneDNN's integer kernels its uint8 kernel logs
        # an error line on every run (grappler moves a float32 cast after it, too). The
        # einsum is exact in float32.
        return tf.cast(tf.einsum("hwc->whc", tf.cast(x, tf.float32)), x.dtype)

    branches = [
        lambda: image,                            # 1: upright
        lambda: image[:, ::-1],                   # 2: mirrored left-right
        lambda: image[::-1, ::-1],                # 3: rotated 180
        lambda: image[::-1],                      # 4: mirrored top-bottom
        lambda: transpose(image),                 # 5: transposed
        lambda: transpose(image)[:, ::-1],        # 6: stored turned 90 ccw: turn 90 cw
        lambda: transpose(image)[::-1, ::-1],     # 7: transverse
        lambda: transpose(image[:, ::-1]),        # 8: stored turned 90 cw: turn 90 ccw
    ]
    return tf.switch_case(orientation - 1, branches)


def jpeg_scale(height: tf.Tensor, width: tf.Tensor, size: int) -> tf.Tensor:
    """log2 of the libjpeg downscale (ratio 1, 2, 4 or 8) for a JPEG resized to `size` (module docstring)."""
    keep = max(MIN_DECODED_SIDE, 4 * size)
    short = tf.minimum(height, width)
    scale = tf.constant(0, tf.int32)
    for s in (1, 2, 3):
        scale = tf.where(short // 2**s >= keep, s, scale)
    return scale


# AutoGraph is not needed (no Python control flow on tensors here: every branch is a
# tf.cond or tf.switch_case) and converting these functions, in every tf.data map and
# tf.function that calls them, took a third of `launch.predict`'s first image.
_graph_as_written = tf.autograph.experimental.do_not_convert


# A function call that is not inlined: inlined, its ~100 ops were visited even when
# the branch is not taken, 0.15 ms per image, as long as decoding a 32x32 JPEG.
@tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([None, None, 3], tf.uint8)],
             autograph=False, experimental_attributes={"_noinline": True})
def _turn_upright(data: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
    return apply_orientation(image, _find_exif_orientation(data))


@_graph_as_written
def decode(data: tf.Tensor, size: int | None = None) -> tf.Tensor:
    """Encoded image bytes -> upright uint8 RGB [h, w, 3].

    Args:
      data: scalar tf.string: JPEG, PNG, GIF (first frame), BMP or WebP bytes.
      size: the side the image will be resized to; a giant JPEG is then decoded
        at a reduced scale (module docstring). None decodes at full scale.

    Raises:
      tf.errors.InvalidArgumentError: not a decodable image (see `decode_error`).
    """
    is_jpeg = tf.io.is_jpeg(data)
    if size is None:
        which = tf.where(is_jpeg, 0, 4)
    else:
        def scale():
            shape = tf.image.extract_jpeg_shape(data)
            return jpeg_scale(shape[0], shape[1], size)
        which = tf.cond(is_jpeg, scale, lambda: tf.constant(4))
    # `ratio` is an op attribute, not an input: one decode op per scale.
    branches = [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r) for r in (1, 2, 4, 8)]
    branches.append(lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image = tf.switch_case(which, branches)
    image.set_shape([None, None, 3])
    # Reading and applying the tag is one branch, skipped by most files without EXIF.
    image = tf.cond(is_jpeg & _may_have_exif(data), lambda: _turn_upright(data, image), lambda: image)
    image.set_shape([None, None, 3])
    return image


@_graph_as_written
def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """[h, w, c] pixels -> float32 [size, size, c] in [0, 255], antialiased bilinear, rounded."""
    image = tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


@_graph_as_written
def decode_and_resize(data: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded image bytes -> float32 [size, size, 3] in [0, 255], exactly as in training."""
    return resize(decode(data, size), size)


# TF's graph context around an op error: `[[{{function_node f}}{{node n}}]]` (the
# failing node), `{{function_node f}}` (the function), `[Op:...]` (the op).
_TF_NOISE = re.compile(r"\s*\[\[.*?\]\]|\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^]]*\].*$", re.S)


def decode_error(error: Exception) -> str:
    """A decode failure in words, without TensorFlow's graph internals.

    `{{function_node __wrapped__DecodeImage_device_...}} Unknown image file
    format. One of JPEG, ... required. [Op:DecodeImage]` becomes `not an image
    TensorFlow can decode (Unknown image file format. One of JPEG, ... required.)`.
    """
    text = _TF_NOISE.sub("", str(getattr(error, "message", None) or error)).strip()
    text = " ".join(text.split())
    if "WebP Animation" in text:
        return "animated WebP is not supported; save its first frame as a still image"
    return f"not an image TensorFlow can decode ({text})" if text else "not an image TensorFlow can decode"
