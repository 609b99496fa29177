#!/usr/bin/env bash
# Builds a small raw M5Product layout whose media come from OTHER tools than
# the ones m5p decodes with: ffmpeg (video/audio), ImageMagick 6 (images) and
# espeak-ng (speech), plus damaged files. Used by tests/test_foreign_media.py.
#
#   tools/make_foreign_raw.sh OUT
#
# Needs: ffmpeg (with libx264, libvpx-vp9, libopus, libvorbis, libmp3lame),
# ImageMagick (`magick` or /usr/bin/convert: /usr/local/bin/convert may be
# something else), espeak-ng. On Debian/Ubuntu:
#   apt-get install -y ffmpeg imagemagick espeak-ng
#
# Items (what the converter should make of them):
#   train f01  jpg (ImageMagick) + h264/aac mp4            -> audio from the video
#   train f02  RGBA png (transparent corners) + mp4 without sound + aac .m4a
#   train f03  webp + flac (stereo 44.1 kHz)
#   train f04  greyscale jpg + ogg/vorbis
#   train f05  CMYK jpg (pure red) + espeak-ng speech .wav
#   train f06  jpg with EXIF orientation 6 (stored red top / blue bottom) + vp9/opus webm
#   train f07  truncated jpg + truncated mp4 + mp3              -> image:truncated
#   train f08  HTML saved as .jpg + zero-byte mp4 + zero-byte mp3 (title only)
#   train f09  no text, HTML-as-jpg only                         -> skipped
#   train f10  palette png + mp4 with a 90-degree display rotation (stored left red /
#              right blue; shown top blue / bottom red, as ffmpeg's autorotate shows it)
#   test  f11  jpg + 0.5 s mp4
#   test  f12  16-bit greyscale png + 8 kHz stereo wav
set -euo pipefail

OUT=${1:?usage: make_foreign_raw.sh OUT}
if command -v magick >/dev/null 2>&1; then IM=(magick); elif [ -x /usr/bin/convert ]; then IM=(/usr/bin/convert); else
  echo "ImageMagick not found (magick or /usr/bin/convert)" >&2; exit 2; fi
command -v ffmpeg >/dev/null || { echo "ffmpeg not found" >&2; exit 2; }
command -v espeak-ng >/dev/null || { echo "espeak-ng not found" >&2; exit 2; }

mkdir -p "$OUT"/images "$OUT"/videos "$OUT"/audios "$OUT"/splits
I="$OUT/images"; V="$OUT/videos"; A="$OUT/audios"
FF=(ffmpeg -nostdin -hide_banner -loglevel error -y)

# --- images (ImageMagick) ---
"${IM[@]}" -size 96x64 gradient:orange-purple "$I/f01.jpg"
"${IM[@]}" -size 64x64 xc:none -fill red -draw "rectangle 16,16 47,47" PNG32:"$I/f02.png"
"${IM[@]}" -size 80x80 plasma:fractal -seed 1 "$I/f03.webp" 2>/dev/null || "${IM[@]}" -size 80x80 gradient:blue-yellow "$I/f03.webp"
"${IM[@]}" -size 64x64 gradient:white-black -colorspace Gray "$I/f04.jpg"
"${IM[@]}" -size 64x64 xc:red -colorspace CMYK "$I/f05.jpg"
# EXIF orientation 6 (display = stored rotated 90 degrees clockwise). ImageMagick 6
# will not add an EXIF block to a new image, so splice an APP1 segment in after
# the 20-byte SOI + JFIF APP0 header.
"${IM[@]}" -size 80x40 xc:red \( -size 80x20 xc:blue \) -geometry +0+20 -composite "$I/f06_plain.jpg"
[ "$(od -An -tx1 -N6 "$I/f06_plain.jpg" | tr -d ' \n')" = "ffd8ffe00010" ] \
  || { echo "unexpected JPEG header from ImageMagick" >&2; exit 1; }
{ head -c 20 "$I/f06_plain.jpg"; printf '\377\341\000\042Exif\0\0MM\0*\0\0\0\010\0\001\001\022\0\003\0\0\0\001\0\006\0\0\0\0\0\0'
  tail -c +21 "$I/f06_plain.jpg"; } > "$I/f06.jpg"; rm "$I/f06_plain.jpg"
"${IM[@]}" -size 256x256 plasma: "$I/f07_full.jpg" 2>/dev/null || "${IM[@]}" -size 256x256 gradient:red-green "$I/f07_full.jpg"
head -c 600 "$I/f07_full.jpg" > "$I/f07.jpg"; rm "$I/f07_full.jpg"
printf '<!DOCTYPE html><html><body>404 Not Found</body></html>\n' > "$I/f08.jpg"
cp "$I/f08.jpg" "$I/f09.jpg"
"${IM[@]}" -size 64x48 gradient:green-yellow PNG8:"$I/f10.png"
"${IM[@]}" -size 40x70 gradient:cyan-magenta "$I/f11.jpg"
"${IM[@]}" -size 50x50 gradient:white-black -colorspace Gray -depth 16 \
  -define png:color-type=0 -define png:bit-depth=16 "$I/f12.png"

# --- videos (ffmpeg) ---
"${FF[@]}" -f lavfi -i testsrc=size=96x64:rate=12:duration=3.5 -f lavfi -i sine=frequency=660:duration=3.5 \
  -c:v libx264 -pix_fmt yuv420p -c:a aac -shortest "$V/f01.mp4"
"${FF[@]}" -f lavfi -i testsrc2=size=64x64:rate=10:duration=2.2 -an -c:v libx264 -pix_fmt yuv420p "$V/f02.mp4"
"${FF[@]}" -f lavfi -i testsrc=size=64x48:rate=25:duration=2.5 -f lavfi -i sine=frequency=300:duration=2.5 \
  -c:v libvpx-vp9 -b:v 200k -c:a libopus "$V/f06.webm"
"${FF[@]}" -f lavfi -i testsrc=size=128x96:rate=25:duration=6 -c:v libx264 -pix_fmt yuv420p "$V/f07_full.mp4"
head -c 20000 "$V/f07_full.mp4" > "$V/f07.mp4"; rm "$V/f07_full.mp4"
: > "$V/f08.mp4"
"${FF[@]}" -f lavfi -i "color=red:size=32x32:rate=5:duration=2[l];color=blue:size=32x32:rate=5:duration=2[r];[l][r]hstack" \
  -c:v libx264 -pix_fmt yuv420p "$V/f10_plain.mp4"
# ffmpeg 5.x only keeps the rotation (a display matrix) when it is set on a stream copy.
"${FF[@]}" -i "$V/f10_plain.mp4" -c copy -metadata:s:v:0 rotate=90 "$V/f10.mp4"; rm "$V/f10_plain.mp4"
"${FF[@]}" -f lavfi -i testsrc=size=48x48:rate=8:duration=0.5 -c:v libx264 -pix_fmt yuv420p "$V/f11.mp4"

# --- audio (ffmpeg, espeak-ng) ---
"${FF[@]}" -f lavfi -i sine=frequency=440:duration=2 -c:a aac "$A/f02.m4a"
"${FF[@]}" -f lavfi -i "sine=frequency=1000:duration=1.5:sample_rate=44100" -ac 2 -c:a flac "$A/f03.flac"
"${FF[@]}" -f lavfi -i "sine=frequency=2000:duration=1.5" -c:a libvorbis "$A/f04.ogg"
espeak-ng -w "$A/f05.wav" "Thank you for shopping with us. This dress is red." 2>/dev/null
"${FF[@]}" -f lavfi -i "sine=frequency=800:duration=1" -c:a libmp3lame "$A/f07.mp3"
: > "$A/f08.mp3"
"${FF[@]}" -f lavfi -i "sine=frequency=500:duration=1:sample_rate=8000" -ac 2 -c:a pcm_s16le "$A/f12.wav"

# --- text ---
cat > "$OUT/train_id_label.json" <<'EOF'
{
 "f01": {"title": "Orange gradient poster 海报", "pv": "颜色#:#橙色#;#材质#:#纸", "label": 0},
 "f02": {"title": "Red square sticker", "pv": "颜色#:#红色#;#", "label": 1},
 "f03": {"title": "Plasma art print", "pv": "尺寸#:#80x80#;#无值#:#", "label": 2},
 "f04": {"title": "灰色 渐变 grey gradient", "pv": "颜色#:#灰色", "label": 0},
 "f05": {"title": "CMYK red dress 红色连衣裙", "pv": "颜色#:#红色#;#尺码#:#M#;#尺码#:#L", "label": 1},
 "f06": {"title": "Rotated phone photo", "pv": "#:#空键#;#方向#:#竖", "label": 2},
 "f07": {"title": "Broken downloads", "pv": "品牌", "label": 3},
 "f08": {"title": "Only a title survives", "pv": ""},
 "f09": {"title": "", "pv": ""},
 "f10": {"title": "Palette image and rotated video", "pv": "风格#:#简约", "label": "4"}
}
EOF
cat > "$OUT/test_id_label.json" <<'EOF'
{
 "f11": {"title": "Short clip", "pv": "时长#:#0.5秒", "label": 0},
 "f12": {"title": "Sixteen-bit grey", "pv": "位深#:#16", "label": -1}
}
EOF
printf '{"f01": "g1", "f11": "g1", "f05": "g2"}\n' > "$OUT/fine_groups.json"
printf 'f11\nf12\n' > "$OUT/splits/coarse_query_ids.txt"
printf 'f01\nf02\nf03\n' > "$OUT/splits/coarse_gallery_ids.txt"
echo "foreign raw layout written to $OUT"
