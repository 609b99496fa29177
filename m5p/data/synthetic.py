"""A synthetic M5Product: the raw layout of shared/M5PRODUCT_LAYOUT.md, with real media.

`generate(output_dir, num_products, seed)` writes `train_id_label.json` and
`test_id_label.json` (`.jsonl` for large sets), `images/<id>.jpg`,
`videos/<id>.mp4`, `audios/<id>.mp3|.wav`, optionally
`image_feature|video_feature|audio_feature/<id>.npy`, `splits/*_ids.txt` and
`fine_groups.json`, so the demo goes through the same converter as the real
dataset.

Latent structure (what a model can learn from it):

* Categories (the label): by default C = max(8, min(40, N // 40)) of 40
  named e-commerce categories (e.g. '运动鞋 sneakers') in 9 families (shoes,
  clothing, ...), with Zipf-like sizes (weights 1 / rank^0.9); both are knobs
  (`num_categories`, `zipf_exponent`). Above 40, categories are synthesized
  as variants of the named ones ('复古运动鞋 retro sneakers', 9 modifiers, up
  to 400). Each category has
  - image: an object shape (8 kinds) on a background pattern (5 kinds) of a
    category hue (10 hues); (shape, pattern) is unique among the first 40
    labels and (shape, pattern, hue) among all 400;
  - video: the same picture, the object moving in one of 7 category motions
    (right, left, down, up, grow, shrink, orbit) over 4 s, in clips of
    3.5-5 s at 4 or 6 fps (mpeg4, a quarter h264);
  - audio: beeps at a category pitch (10 steps of 4 semitones, 250-2000 Hz),
    tempo (4 rates) and chord (3 kinds); (pitch, tempo) is unique among the
    first 40 labels and (pitch, tempo, chord) among the first 120 (labels 120
    apart sound alike; image and text still tell them apart);
  - title: its Chinese and English names and 4 + 2 category words (variants:
    their modifier's words in place of half of them);
  - table: `attributes_per_category` (3) category-chosen keys of its family
    (shoes: 尺码, 鞋面材质...) with category-preferred values, and a category
    style word (款式). Variants use their base's family, so tables alone do
    not separate a variant from its base category.
* Instances (products): brand, model number, main colour, second colour,
  stripe count, object size/offset, attribute values and a variant (0-3).
  About 30% of instances (`multi_listing_fraction`) have 2-4 listings
  (`group_size_range`); those form the fine groups (`fine_groups.json`).
  Listings of one instance share all of the above and differ in title word
  order and optional words, table order and dropped keys, image jitter
  (shift, scale, brightness, noise), video duration/frame rate and audio
  phase, noise, length and sample rate.
* Complementary cues: brand in title, table and an image badge colour;
  model number in title and table; main colour in image, video, table and
  often title; stripes and second colour only in image and video; the
  variant only in video (number of dots) and audio (a second note).
* Splits: products (all their listings) go to test for ~20% of each
  category's items, the rest to train; the retrieval and classification id
  lists are drawn from them (`_split_lists`).
* Noise: captions are well matched, partially matched (~10%: mixed with
  another category's words) or poorly matched (0% by default: the title of
  another category's product) per `caption_quality`; ~3% empty titles, ~3%
  empty tables and ~10% malformed tables (pairs without '#:#', empty keys or
  values, stray separators, repeated keys); a few train items with label -1
  or no label key; a few items without an image; a few videos carry the
  item's sound as an audio track instead of a separate audio file; about
  `damaged_fraction` of media files are damaged (undecodable); from 200
  items on, one train item has no usable modality at all.
* Precomputed features (`feature_fraction`, 0 by default), as in the real
  release: `image_feature/<id>.npy` float32 [5, 64] (regions),
  `video_feature/<id>.npy` [T, 32] (one row per started second of the video)
  and `audio_feature/<id>.npy` [T, 24] (per second of audio), for the
  modalities the item has. They are fixed random projections of a
  per-category latent plus a per-instance latent (and, for video, the
  category's motion over time), plus per-listing noise, so they carry the
  same labels and fine groups as the media. `feature_only_fraction` of those
  items get features instead of media files.

Scale: planning keeps O(N) small numpy arrays (about 35 bytes an item, ~150
at the planning peak), no per-item Python objects; items are written through a bounded window of
threads, the split files, id lists and fine groups are streamed to disk, and
the summary's per-item lists are capped (`summary_list_cap`), so memory
stays flat from 100 to 1M items.

Everything is deterministic per seed: per-item content comes from random
streams keyed by (seed, stream, id), so `corrupt_modality` changes only that
modality's content, and the same seed gives byte-identical files (PyAV's
encoders run single-threaded with fixed options; Pillow JPEG is
deterministic). New knobs at their defaults give the same files as before
they existed.
"""
from __future__ import annotations

import collections
import colorsys
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import time
from array import array
from fractions import Fraction
from typing import Any, Callable, Iterable, Iterator, Sequence

import av
import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

MARKER = ".m5p_synthetic.json"  # Says the folder holds a generated set (see load_summary).


# ---------------------------------------------------------------------------
# Vocabularies.

# (zh, en, rgb)
COLOURS: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("红色", "red", (220, 30, 40)),
    ("橙色", "orange", (245, 130, 20)),
    ("黄色", "yellow", (245, 215, 30)),
    ("绿色", "green", (40, 170, 60)),
    ("青色", "cyan", (30, 200, 210)),
    ("蓝色", "blue", (30, 70, 220)),
    ("紫色", "purple", (140, 50, 190)),
    ("粉色", "pink", (250, 130, 190)),
    ("黑色", "black", (25, 25, 25)),
    ("白色", "white", (245, 245, 245)),
    ("灰色", "grey", (130, 130, 130)),
    ("棕色", "brown", (130, 80, 35)),
)

MARKETING = ("新款", "包邮", "正品", "热卖", "爆款", "特价", "限时秒杀", "官方旗舰店", "厂家直销",
             "网红同款", "高品质", "现货", "2023", "2024", "新品", "ins风", "hot", "new", "sale")

# Family: table keys with value vocabularies, and brands.
FAMILIES: dict[str, dict[str, Any]] = {
    "shoes": dict(
        keys={"尺码": ["35", "36", "37", "38", "39", "40", "41", "42", "43", "44"],
              "鞋面材质": ["真皮", "网布", "帆布", "合成革", "飞织"],
              "闭合方式": ["系带", "魔术贴", "一脚蹬", "拉链"],
              "适用人群": ["男士", "女士", "儿童", "情侣"],
              "鞋底材质": ["橡胶", "EVA", "PU", "TPR"]},
        brands=["踏步", "飞驰", "Nova", "Stride", "Kuma", "云跑", "Aerofit", "步云"]),
    "clothing": dict(
        keys={"尺码": ["S", "M", "L", "XL", "XXL"],
              "面料": ["纯棉", "涤纶", "羊毛", "真丝", "雪纺", "亚麻"],
              "袖长": ["长袖", "短袖", "无袖", "七分袖"],
              "适用季节": ["春季", "夏季", "秋季", "冬季", "四季"],
              "版型": ["宽松", "修身", "标准", "直筒"]},
        brands=["衣本", "素简", "Urbano", "Lumi", "MOCO", "森屿", "Fabrik", "初语"]),
    "electronics": dict(
        keys={"内存": ["4GB", "6GB", "8GB", "12GB", "16GB"],
              "存储容量": ["64GB", "128GB", "256GB", "512GB"],
              "连接方式": ["蓝牙5.0", "蓝牙5.3", "Type-C", "无线"],
              "电池容量": ["3000mAh", "4500mAh", "5000mAh", "10000mAh", "20000mAh"],
              "屏幕尺寸": ["1.4英寸", "6.1英寸", "6.7英寸", "10.9英寸", "12.4英寸"]},
        brands=["星驰", "Voltix", "凌云", "Zenix", "小极", "Auro", "酷声", "Pixon"]),
    "home": dict(
        keys={"材质": ["实木", "金属", "塑料", "布艺", "玻璃", "竹制"],
              "风格": ["北欧", "简约", "中式", "美式", "日式"],
              "尺寸": ["40cm", "60cm", "80cm", "120cm", "180cm"],
              "安装方式": ["免安装", "壁挂", "落地", "组装"],
              "适用空间": ["客厅", "卧室", "书房", "厨房", "浴室"]},
        brands=["木匠", "栖居", "Hygge", "Casa", "宜家乐", "Nordi", "暖居", "Loft"]),
    "food": dict(
        keys={"净含量": ["100g", "250g", "500g", "1kg", "2.5kg"],
              "保质期": ["6个月", "12个月", "18个月", "24个月"],
              "产地": ["云南", "四川", "浙江", "新疆", "福建", "安徽"],
              "包装方式": ["袋装", "盒装", "罐装", "礼盒装"],
              "储存条件": ["常温", "冷藏", "阴凉干燥处"]},
        brands=["山野", "良品坊", "Nutri", "禾源", "Tasty", "农夫家", "GoldLeaf", "百味"]),
    "beauty": dict(
        keys={"容量": ["15ml", "30ml", "50ml", "100ml"],
              "功效": ["保湿", "美白", "控油", "抗皱", "补水"],
              "适合肤质": ["干性", "油性", "混合性", "任何肤质"],
              "保质期": ["24个月", "36个月"],
              "产品类型": ["正装", "小样", "套装"]},
        brands=["花颜", "Lumiere", "雪肌", "Verde", "玉兰", "Bloom", "素研", "Aqua"]),
    "toys": dict(
        keys={"适用年龄": ["1-3岁", "3-6岁", "6岁以上", "14岁以上"],
              "材质": ["塑料", "毛绒", "木质", "ABS"],
              "是否带电池": ["是", "否"],
              "认证": ["3C认证", "CE认证"],
              "玩具类型": ["益智", "模型", "拼装", "遥控"]},
        brands=["乐趣", "童年", "Blocko", "Tiki", "奇思", "Wonda", "小熊家", "PlayOn"]),
    "sports": dict(
        keys={"材质": ["TPE", "NBR", "PVC", "铸铁", "尼龙", "牛津布"],
              "适用场景": ["家用", "健身房", "户外", "通勤"],
              "重量": ["1kg", "2kg", "5kg", "10kg"],
              "规格": ["183x61cm", "20L", "30L", "40L"],
              "适用人群": ["男士", "女士", "通用"]},
        brands=["力行", "Vigor", "跃动", "Peak", "Trekk", "野途", "Flexi", "健将"]),
    "kitchen": dict(
        keys={"功率": ["600W", "800W", "1500W", "2000W"],
              "容量": ["1.5L", "1.7L", "3L", "4L", "5L"],
              "材质": ["不锈钢", "陶瓷", "铸铁", "不粘涂层"],
              "电压": ["220V"],
              "控制方式": ["机械", "微电脑", "触控"]},
        brands=["厨福", "美炊", "Cucina", "Kitto", "九阳光", "Chefly", "好煮意", "Ovena"]),
}

# (zh, en, family, 4 zh words, 2 en words)
CATEGORY_POOL: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("运动鞋", "sneakers", "shoes", ("跑步", "减震", "透气", "气垫"), ("running", "breathable")),
    ("高跟鞋", "high heels", "shoes", ("尖头", "细跟", "优雅", "婚鞋"), ("stiletto", "elegant")),
    ("帆布鞋", "canvas shoes", "shoes", ("低帮", "百搭", "学生", "小白鞋"), ("low-top", "casual")),
    ("拖鞋", "slippers", "shoes", ("居家", "防滑", "凉拖", "浴室"), ("home", "non-slip")),
    ("靴子", "boots", "shoes", ("马丁靴", "加绒", "短靴", "保暖"), ("martin", "winter")),
    ("连衣裙", "dress", "clothing", ("碎花", "长裙", "收腰", "法式"), ("floral", "midi")),
    ("T恤", "t-shirt", "clothing", ("圆领", "宽松", "印花", "纯色"), ("crew-neck", "oversize")),
    ("牛仔裤", "jeans", "clothing", ("直筒", "高腰", "破洞", "九分"), ("denim", "slim")),
    ("羽绒服", "down jacket", "clothing", ("加厚", "白鸭绒", "轻薄", "长款"), ("puffer", "warm")),
    ("卫衣", "hoodie", "clothing", ("连帽", "套头", "情侣装", "抓绒"), ("pullover", "fleece")),
    ("衬衫", "shirt", "clothing", ("商务", "免烫", "条纹", "职业"), ("formal", "oxford")),
    ("手机", "smartphone", "electronics", ("全面屏", "5G", "拍照", "游戏"), ("camera", "phone")),
    ("耳机", "earphones", "electronics", ("降噪", "入耳式", "真无线", "运动"), ("ANC", "earbuds")),
    ("平板电脑", "tablet", "electronics", ("学习", "护眼", "大屏", "办公"), ("pad", "11inch")),
    ("智能手表", "smartwatch", "electronics", ("心率", "血氧", "防水", "NFC"), ("fitness", "GPS")),
    ("充电宝", "power bank", "electronics", ("快充", "大容量", "便携", "超薄"), ("fast-charge", "portable")),
    ("蓝牙音箱", "bluetooth speaker", "electronics", ("低音炮", "户外", "重低音", "迷你"), ("bass", "outdoor")),
    ("置物架", "shelf", "home", ("多层", "落地式", "角架", "收纳架"), ("rack", "storage")),
    ("沙发", "sofa", "home", ("布艺", "小户型", "三人位", "懒人"), ("couch", "fabric")),
    ("台灯", "desk lamp", "home", ("护眼灯", "LED", "充电", "床头"), ("LED", "reading")),
    ("床单", "bed sheet", "home", ("四件套", "单人", "磨毛", "被套"), ("bedding", "cotton")),
    ("收纳盒", "storage box", "home", ("抽屉式", "透明", "大号", "衣物"), ("organizer", "box")),
    ("茶叶", "tea", "food", ("绿茶", "明前", "龙井", "散装"), ("green-tea", "oolong")),
    ("坚果", "nuts", "food", ("每日", "混合", "核桃", "腰果"), ("mixed-nuts", "snack")),
    ("咖啡", "coffee", "food", ("速溶", "美式", "拿铁", "咖啡豆"), ("instant", "arabica")),
    ("饼干", "biscuits", "food", ("早餐", "苏打", "夹心", "酥脆"), ("cookies", "cracker")),
    ("蜂蜜", "honey", "food", ("纯正", "土蜂蜜", "农家", "天然"), ("raw-honey", "organic")),
    ("口红", "lipstick", "beauty", ("哑光", "滋润", "显白", "唇釉"), ("matte", "lip")),
    ("面霜", "face cream", "beauty", ("修护", "晚霜", "敏感肌", "滋养"), ("cream", "repair")),
    ("洗面奶", "facial cleanser", "beauty", ("氨基酸", "温和", "深层清洁", "泡沫"), ("cleanser", "foam")),
    ("香水", "perfume", "beauty", ("淡香", "持久", "花香", "清新"), ("EDT", "fragrance")),
    ("积木", "building blocks", "toys", ("拼装", "益智", "颗粒", "城市"), ("bricks", "STEM")),
    ("毛绒玩具", "plush toy", "toys", ("公仔", "抱枕", "玩偶", "可爱"), ("plush", "doll")),
    ("遥控车", "RC car", "toys", ("越野", "漂移", "遥控", "高速"), ("RC", "off-road")),
    ("瑜伽垫", "yoga mat", "sports", ("加厚", "防滑垫", "健身", "初学者"), ("yoga", "mat")),
    ("哑铃", "dumbbell", "sports", ("可调节", "包胶", "举重", "家用"), ("dumbbell", "workout")),
    ("背包", "backpack", "sports", ("双肩包", "旅行", "电脑包", "登山"), ("backpack", "travel")),
    ("电饭煲", "rice cooker", "kitchen", ("智能", "预约", "多功能", "迷你"), ("rice-cooker", "smart")),
    ("电水壶", "electric kettle", "kitchen", ("烧水壶", "保温", "304不锈钢", "自动断电"), ("kettle", "auto-off")),
    ("炒锅", "wok", "kitchen", ("不粘锅", "铁锅", "平底", "燃气灶"), ("wok", "non-stick")),
)
MAX_CATEGORIES = len(CATEGORY_POOL)

# Modifiers that turn a named category into a distinct variant (labels >= 40):
# (zh, en, 2 zh words, en word), none of them in any other vocabulary.
MODIFIERS: tuple[tuple[str, str, tuple[str, str], str], ...] = (
    ("复古", "retro", ("怀旧", "港风"), "vintage"),
    ("轻奢", "luxe", ("高级感", "精致"), "luxury"),
    ("国潮", "guochao", ("中国风", "潮牌"), "chinoiserie"),
    ("极简", "minimal", ("无印风", "素雅"), "minimalist"),
    ("森系", "forest", ("原木风", "文艺"), "natural"),
    ("赛博", "cyber", ("科技感", "炫彩"), "futuristic"),
    ("工装", "workwear", ("机能风", "耐磨"), "utility"),
    ("田园", "pastoral", ("乡村风", "格纹"), "country"),
    ("马卡龙", "macaron", ("糖果色", "少女心"), "pastel"),
)
# Image signatures (shape x pattern x hue) are distinct up to 400 labels; so
# are names. More would repeat a picture, so `generate` refuses them.
MAX_SYNTH_CATEGORIES = MAX_CATEGORIES * (1 + len(MODIFIERS))

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
PATTERNS = ("plain", "hstripes", "vstripes", "checker", "dots")
MOTIONS = ("right", "left", "down", "up", "grow", "shrink", "orbit")
NUM_HUES = 10
PITCHES_HZ = tuple(250.0 * 2 ** (4 * k / 12) for k in range(10))  # 250 .. 2000 Hz.
TEMPOS = (1.5, 2.5, 4.0, 6.0)  # Beeps per second.
CHORDS = ((1.0,), (1.0, 1.5), (1.0, 4 / 3))
VARIANT_RATIOS = (0.5, 0.75, 1.25, 2.0)  # Second note, relative to the base pitch.

MODALITY_ALIASES = {"text": "text", "title": "text", "table": "table", "pv": "table",
                    "image": "image", "video": "video", "audio": "audio"}

DAMAGE_KINDS = {  # kind: (modality, extension)
    "truncated_jpeg": ("image", ".jpg"),
    "html_as_jpg": ("image", ".jpg"),
    "empty_mp4": ("video", ".mp4"),
    "truncated_mp4": ("video", ".mp4"),
    "random_bytes_mp3": ("audio", ".mp3"),
}

MEDIA_DIRS = {"image": "images", "video": "videos", "audio": "audios"}
FEATURE_DIRS = {"image": "image_feature", "video": "video_feature", "audio": "audio_feature"}
IMAGE_FEATURE_SHAPE = (5, 64)  # (regions, dims) per image.
VIDEO_FEATURE_DIM = 32  # Dims per second of video.
AUDIO_FEATURE_DIM = 24  # Dims per second of audio.
FEATURE_LATENT_DIM = 16
SPLIT_LISTS = ("coarse_query", "coarse_gallery", "fine_query", "fine_gallery", "cls_train", "cls_test")
SPLIT_FORMATS = ("auto", "json", "jsonl")
JSONL_FROM = 100_000  # split_format='auto' writes .jsonl from this many items on.
SUMMARY_LIST_CAP = 1000  # Default cap on per-item lists in the summary and marker.

# Random streams (the second element of every seed sequence).
_S_GLOBAL, _S_INSTANCE, _S_TITLE, _S_PV, _S_IMAGE, _S_VIDEO, _S_AUDIO, _S_MEDIA, _S_DAMAGE, _S_CORRUPT = range(10)
_S_FEATURE, _S_FEAT_CAT, _S_FEAT_INST, _S_FEAT_ITEM = range(10, 14)


def _rng(seed: int, stream: int, key: int = 0, *more: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, stream, key, *more]))


# ---------------------------------------------------------------------------
# The latent structure.


@dataclasses.dataclass(frozen=True)
class Category:
  label: int
  zh: str
  en: str
  family: str
  words_zh: tuple[str, ...]
  words_en: tuple[str, ...]
  keys: tuple[str, ...]  # Table keys of this category (3 of its family's 5 by default).
  preferred: dict  # key -> the 2-3 values this category mostly uses.
  brands: tuple[str, ...]
  palette: tuple[int, ...]  # Colour indices this category mostly uses.
  shape: str
  pattern: str
  hue: float
  motion: str
  pitch_hz: float
  tempo: float
  chord: tuple[float, ...]

  @property
  def name(self) -> str:
    return f"{self.zh} {self.en}"


@dataclasses.dataclass(frozen=True)
class Instance:
  index: int
  category: int  # label
  brand: str
  model: str
  colour: int
  colour2: int
  stripes: int
  variant: int
  scale: float  # Object half-extent as a fraction of the picture.
  offset: tuple[float, float]  # Object centre offset, fraction of the picture.
  attrs: tuple[tuple[str, str], ...]  # (key, value) for the category's keys.
  style: str  # A category word used as the table's 款式 value.
  title_zh: tuple[str, ...]
  title_en: str
  timbre: float  # Audio harmonic amount.
  num_items: int
  split: str


@dataclasses.dataclass
class Item:
  """One listing's plan, built on demand from `Plan`'s arrays (never kept for all items)."""
  item_id: str
  instance: int
  split: str
  label_mode: str = "ok"  # 'ok' | 'minus_one' | 'absent'
  title_mode: str = "ok"  # 'ok' | 'noisy' (partially matched) | 'empty' | 'poor' (poorly matched)
  pv_mode: str = "ok"  # 'ok' | 'empty' | a malformation kind
  image: bool = True
  video: bool = False
  video_codec: str = "mpeg4"
  audio: str | None = None  # None | 'mp3' | 'wav' | 'track' (sound track of the video)
  ghost: bool = False  # No usable modality at all.
  features: bool = False  # Also writes precomputed feature files.
  feature_only: bool = False  # Features instead of media files.
  donor: dict = dataclasses.field(default_factory=dict)  # corrupted modality -> donor instance
  damage: dict = dataclasses.field(default_factory=dict)  # modality -> damage kind


def _pool_entry(p: int) -> tuple[str, str, str, tuple[str, ...], tuple[str, ...]]:
  """Category pool entry p: a named category (p < 40) or a modifier's variant of one."""
  zh, en, family, words_zh, words_en = CATEGORY_POOL[p % MAX_CATEGORIES]
  if p < MAX_CATEGORIES:
    return zh, en, family, words_zh, words_en
  mzh, men, mwords, mword_en = MODIFIERS[p // MAX_CATEGORIES - 1]
  return (mzh + zh, f"{men} {en}", family, (words_zh[0], mwords[0], words_zh[1], mwords[1]),
          (mword_en, words_en[0]))


def _make_categories(num: int, rng: np.random.Generator, attributes: int = 3) -> list[Category]:
  """`num` categories; labels 40 apart share shape and pattern but not hue or name."""
  chosen = rng.permutation(MAX_CATEGORIES if num <= MAX_CATEGORIES else MAX_SYNTH_CATEGORIES)[:num]
  cats = []
  for label, pool_index in enumerate(chosen):
    zh, en, family, words_zh, words_en = _pool_entry(int(pool_index))
    fam = FAMILIES[family]
    key_names = list(fam["keys"])
    keys = tuple(key_names[i] for i in sorted(rng.choice(len(key_names), attributes, replace=False)))
    preferred = {}
    for k in keys:
      vocab = fam["keys"][k]
      n = min(len(vocab), int(rng.integers(2, 4)))
      preferred[k] = tuple(vocab[i] for i in rng.choice(len(vocab), n, replace=False))
    brands = tuple(fam["brands"][i] for i in rng.choice(len(fam["brands"]), 4, replace=False))
    palette = tuple(int(i) for i in rng.choice(len(COLOURS), 4, replace=False))
    r, q = label % MAX_CATEGORIES, label // MAX_CATEGORIES  # q = 0 below 40: the original signatures.
    a, b = divmod(r, 8)
    c, d = divmod(r, 10)
    cats.append(Category(
        label=label, zh=zh, en=en, family=family, words_zh=words_zh, words_en=words_en,
        keys=keys, preferred=preferred, brands=brands, palette=palette,
        shape=SHAPES[b], pattern=PATTERNS[(a + b) % len(PATTERNS)],
        hue=((3 * r + q) % NUM_HUES) / NUM_HUES, motion=MOTIONS[label % len(MOTIONS)],
        pitch_hz=PITCHES_HZ[(3 * d) % len(PITCHES_HZ)], tempo=TEMPOS[(c + d) % len(TEMPOS)],
        chord=CHORDS[(r + q) % len(CHORDS)]))
  return cats


def _category_sizes(n: int, c: int, rng: np.random.Generator, exponent: float = 0.9) -> np.ndarray:
  """Zipf-like sizes summing to n, each >= min(4, n // c), in a random label order."""
  weights = 1.0 / np.arange(1, c + 1) ** exponent
  floor = min(4, n // c)
  spare = n - floor * c
  raw = weights / weights.sum() * spare
  sizes = np.floor(raw).astype(int)
  order = np.argsort(-(raw - sizes), kind="stable")
  sizes[order[:spare - sizes.sum()]] += 1
  sizes += floor
  return sizes[rng.permutation(c)]


def _make_instance(index: int, cat: Category, num_items: int, split: str, seed: int) -> Instance:
  rng = _rng(seed, _S_INSTANCE, index)
  fam = FAMILIES[cat.family]
  pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
  colour = pick(cat.palette) if rng.random() < 0.8 else int(rng.integers(len(COLOURS)))
  colour2 = int((colour + rng.integers(1, len(COLOURS))) % len(COLOURS))
  attrs = tuple((k, pick(cat.preferred[k]) if rng.random() < 0.85 else pick(fam["keys"][k]))
                for k in cat.keys)
  brand = pick(cat.brands) if rng.random() < 0.9 else pick(fam["brands"])
  letters = "ABCDEFGHJKLMNPRSTVXZ"
  model = f"{letters[int(rng.integers(20))]}{letters[int(rng.integers(20))]}{int(rng.integers(10, 1000))}"
  words = list(rng.choice(len(cat.words_zh), 2, replace=False))
  return Instance(
      index=index, category=cat.label, brand=brand, model=model, colour=colour, colour2=colour2,
      stripes=int(rng.integers(0, 4)), variant=int(rng.integers(len(VARIANT_RATIOS))),
      scale=float(rng.uniform(0.26, 0.36)),
      offset=(float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
      attrs=attrs, style=cat.words_zh[int(rng.integers(len(cat.words_zh)))],
      title_zh=tuple(cat.words_zh[int(i)] for i in words), title_en=pick(cat.words_en),
      timbre=float(rng.uniform(0.0, 0.5)), num_items=num_items, split=split)


# ---------------------------------------------------------------------------
# Text.


def make_title(cat: Category, inst: Instance, rng: np.random.Generator,
               noise_cat: Category | None = None) -> str:
  """A mixed Chinese/English title; `noise_cat` mixes in another category's words."""
  colour = COLOURS[inst.colour]
  optional = []
  if rng.random() < 0.9:
    optional.append(cat.zh)
  if rng.random() < 0.4:
    optional.append(cat.en)
  optional += list(inst.title_zh)
  if rng.random() < 0.6:
    optional.append(inst.title_en)
  if rng.random() < 0.6:
    optional.append(colour[0])
  if rng.random() < 0.15:
    optional.append(colour[1])
  if rng.random() < 0.4:
    optional.append(inst.attrs[int(rng.integers(len(inst.attrs)))][1])
  if rng.random() < 0.6:
    optional.append(inst.model)
  if len(optional) > 3 and rng.random() < 0.5:  # Drop one word.
    optional.pop(int(rng.integers(len(optional))))
  for _ in range(int(rng.integers(0, 3))):
    optional.append(MARKETING[int(rng.integers(len(MARKETING)))])
  if noise_cat is not None:  # A poorly matched caption.
    noise = list(noise_cat.words_zh[:2]) + [noise_cat.zh if rng.random() < 0.5 else noise_cat.en]
    keep = max(1, len(optional) // 2)
    optional = [optional[i] for i in sorted(rng.choice(len(optional), keep, replace=False))] + noise
  order = rng.permutation(len(optional))
  words = [optional[i] for i in order]
  if rng.random() < 0.7:
    words.insert(0, inst.brand)
  else:
    words.insert(int(rng.integers(len(words) + 1)), inst.brand)
  return " ".join(words)


_PV_MALFORMATIONS = ("no_separator", "empty_key", "empty_value", "stray_separator", "repeated_key")


def make_pv(cat: Category, inst: Instance, rng: np.random.Generator, mode: str = "ok") -> str:
  """'k1#:#v1#;#k2#:#v2' with listing-level order and dropped keys; `mode` malforms it."""
  if mode == "empty":
    return ""
  pairs = [("颜色", COLOURS[inst.colour][0])]
  if rng.random() < 0.7:
    pairs.append(("型号", inst.model))
  pairs += list(inst.attrs)
  pairs.append(("款式", inst.style))
  pairs = [p for p in pairs if rng.random() > 0.15]  # Listing-level dropped keys.
  pairs = [pairs[i] for i in rng.permutation(len(pairs))]
  pairs.insert(0 if rng.random() < 0.6 else int(rng.integers(len(pairs) + 1)), ("品牌", inst.brand))
  pieces = [f"{k}#:#{v}" for k, v in pairs]
  at = int(rng.integers(len(pieces) + 1))
  if mode == "no_separator":
    pieces.insert(at, ["包邮", "正品保证", "假一赔十", "7天无理由退换"][int(rng.integers(4))])
  elif mode == "empty_key":
    pieces.insert(at, "#:#" + MARKETING[int(rng.integers(len(MARKETING)))])
  elif mode == "empty_value":
    pieces.insert(at, ["货号", "上市时间", "产地", "售后服务"][int(rng.integers(4))] + "#:#")
  elif mode == "stray_separator":
    kind = int(rng.integers(3))
    if kind == 0:
      pieces.insert(0, "")
    elif kind == 1:
      pieces.append("")
    else:
      pieces.insert(at, "")
  elif mode == "repeated_key":
    pieces.insert(at, f"颜色#:#{COLOURS[inst.colour2][0]}")
  return "#;#".join(pieces)


# ---------------------------------------------------------------------------
# Pictures.


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def _background(cat: Category, size: int, phase: tuple[int, int]) -> np.ndarray:
  light, dark = _hsv(cat.hue, 0.35, 0.92), _hsv(cat.hue, 0.75, 0.6)
  period = max(4, size // 6)
  yy, xx = np.mgrid[:size, :size]
  yy, xx = yy + phase[0], xx + phase[1]
  if cat.pattern == "plain":
    ink = np.zeros((size, size), bool)
  elif cat.pattern == "hstripes":
    ink = (yy // (period // 2)) % 2 == 0
  elif cat.pattern == "vstripes":
    ink = (xx // (period // 2)) % 2 == 0
  elif cat.pattern == "checker":
    ink = ((yy // (period // 2)) + (xx // (period // 2))) % 2 == 0
  else:  # dots
    r = period / 2
    ink = ((yy % period) - r + 0.5) ** 2 + ((xx % period) - r + 0.5) ** 2 < (period / 3.2) ** 2
  return np.where(ink[..., None], dark, light).astype(np.float32)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  img = Image.new("L", (size, size), 0)
  d = ImageDraw.Draw(img)
  if shape == "circle":
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
  elif shape == "square":
    q = r * 0.85
    d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
  elif shape == "triangle":
    d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
  elif shape == "diamond":
    d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
  elif shape == "cross":
    w = 0.36 * r
    d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
    d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
  elif shape == "ring":
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    q = 0.5 * r
    d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
  elif shape == "star":
    pts = []
    for k in range(10):
      a = -math.pi / 2 + k * math.pi / 5
      rr = r if k % 2 == 0 else 0.45 * r
      pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    d.polygon(pts, fill=255)
  else:  # bar
    d.rectangle([cx - r, cy - 0.42 * r, cx + r, cy + 0.42 * r], fill=255)
  return np.asarray(img) > 127


def _paint_object(canvas: np.ndarray, cat: Category, inst: Instance, cx: float, cy: float,
                  r: float) -> None:
  size = canvas.shape[0]
  mask = _shape_mask(cat.shape, size, cx, cy, r)
  if not mask.any():
    return
  canvas[mask] = COLOURS[inst.colour][2]
  if inst.stripes:
    rows = np.nonzero(mask.any(axis=1))[0]
    y0, y1 = rows[0], rows[-1] + 1
    band = (y1 - y0) / (2 * inst.stripes + 1)
    yy = np.arange(size)[:, None]
    stripe = np.zeros((size, 1), bool)
    for i in range(inst.stripes):
      lo = y0 + (2 * i + 1) * band
      stripe |= (yy >= lo) & (yy < lo + band)
    canvas[mask & stripe] = COLOURS[inst.colour2][2]
  inner = mask.copy()  # A dark outline keeps light objects visible on light backgrounds.
  inner[1:] &= mask[:-1]
  inner[:-1] &= mask[1:]
  inner[:, 1:] &= mask[:, :-1]
  inner[:, :-1] &= mask[:, 1:]
  canvas[mask & ~inner] = (35, 35, 35)


def _brand_rgb(brand: str) -> tuple[int, int, int]:
  h = sum(ord(ch) * (i + 1) for i, ch in enumerate(brand)) % 997
  return tuple(int(x) for x in _hsv((h % 12) / 12, 0.9, 0.35 + 0.5 * ((h // 12) % 2)))


def render_image(cat: Category, inst: Instance, rng: np.random.Generator, size: int) -> np.ndarray:
  """One listing's main image: uint8 [size, size, 3]."""
  phase = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
  canvas = _background(cat, size, phase)
  jitter = rng.normal(0, 0.02, 2)
  cx = size * (0.5 + inst.offset[0] + jitter[0])
  cy = size * (0.5 + inst.offset[1] + jitter[1])
  _paint_object(canvas, cat, inst, cx, cy, size * inst.scale * rng.uniform(0.94, 1.06))
  if rng.random() < 0.7:  # Brand badge.
    b = max(2, size // 8)
    canvas[1:1 + b, 1:1 + b] = _brand_rgb(inst.brand)
  return _finish(canvas, rng)


def _finish(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  canvas = canvas * rng.uniform(0.9, 1.1) + rng.normal(0, 4.0, canvas.shape)
  return np.clip(canvas, 0, 255).astype(np.uint8)


def render_frames(cat: Category, inst: Instance, rng: np.random.Generator, size: int,
                  num_frames: int, fps: float) -> list[np.ndarray]:
  """A listing's video frames: the instance's object in its category's motion.

  The motion runs over 4 s whatever the clip's length (later frames hold the
  end position), so frames sampled at 1 fps sit at the same places in every
  clip of a category, up to a small per-listing start jitter.
  """
  phase = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
  background = _background(cat, size, phase)
  base_cx = size * (0.5 + inst.offset[0] * 0.5)
  base_cy = size * (0.5 + inst.offset[1] * 0.5)
  r0 = size * inst.scale * 0.85
  amp = size * 0.28
  start = rng.uniform(0, 0.06)
  gain = rng.uniform(0.92, 1.08)
  dots = inst.variant + 1
  pad = 8  # Frames take shifted crops of one noise block (cheaper than fresh noise).
  noise = rng.normal(0, 3.0, (size + pad, size + pad, 3)).astype(np.float32)
  frames = []
  for i in range(num_frames):
    u = min(1.0, start + (i / fps) / 4.0)  # Same course in every clip: 1 fps samples agree.
    cx, cy, r = base_cx, base_cy, r0
    if cat.motion == "right":
      cx += amp * (2 * u - 1)
    elif cat.motion == "left":
      cx -= amp * (2 * u - 1)
    elif cat.motion == "down":
      cy += amp * (2 * u - 1)
    elif cat.motion == "up":
      cy -= amp * (2 * u - 1)
    elif cat.motion == "grow":
      r = r0 * (0.5 + 0.8 * u)
    elif cat.motion == "shrink":
      r = r0 * (1.3 - 0.8 * u)
    else:  # orbit, one turn in 4 s
      a = 2 * math.pi * (i / fps) / 4.0
      cx += amp * math.cos(a)
      cy += amp * math.sin(a)
    canvas = background.copy()
    _paint_object(canvas, cat, inst, cx, cy, r)
    d = max(2, size // 16)  # Variant dots, bottom right.
    for k in range(dots):
      x0 = size - 2 - (k + 1) * (d + 2)
      canvas[size - 2 - d:size - 2, x0:x0 + d] = COLOURS[inst.colour2][2]
    oy, ox = rng.integers(0, pad + 1, 2)
    canvas *= np.float32(gain)
    canvas += noise[oy:oy + size, ox:ox + size]
    frame = np.clip(canvas, 0, 255).astype(np.uint8)
    frames.append(frame)
  return frames


# ---------------------------------------------------------------------------
# Sound.


def synth_audio(cat: Category, inst: Instance, rng: np.random.Generator, sample_rate: int,
                seconds: float) -> np.ndarray:
  """Beeps at the category's pitch, tempo and chord; the variant sets a second note."""
  t = np.arange(int(sample_rate * seconds), dtype=np.float32) / np.float32(sample_rate)
  f0 = cat.pitch_hz * (1 + rng.normal(0, 0.004))
  beat = 1.0 / cat.tempo
  tb = (t + np.float32(rng.uniform(0, beat))) % np.float32(beat)
  on = 0.45 * beat
  env = np.clip(tb / 0.008, 0, 1) * np.exp(-3.0 / on * tb) * (tb < on)
  tone = np.zeros_like(t)
  for ratio in cat.chord:
    phase = np.float32(2 * np.pi * f0 * ratio) * t
    tone += np.sin(phase) + np.float32(inst.timbre) * np.sin(2 * phase)
  wave = env * tone / np.float32(len(cat.chord))
  t2 = tb - np.float32(on)  # The variant's note in the gap after each beep.
  gap = (t2 >= 0) & (t2 < 0.3 * beat)
  env2 = np.where(gap, np.clip(t2 / 0.008, 0, 1) * np.exp(-5.0 / beat * np.maximum(t2, 0)), 0)
  wave += np.float32(0.45) * env2 * np.sin(np.float32(2 * np.pi * f0 * VARIANT_RATIOS[inst.variant]) * t)
  wave += rng.normal(0, rng.uniform(0.01, 0.04), t.shape).astype(np.float32)
  wave *= np.float32(rng.uniform(0.4, 0.6) / max(1e-6, float(np.abs(wave).max())))
  return wave.astype(np.float32)


# ---------------------------------------------------------------------------
# Encoding (single-threaded, fixed options: byte-identical output per seed).


def write_jpeg(path: str, pixels: np.ndarray) -> None:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  with open(path, "wb") as f:
    f.write(buf.getvalue())


def _audio_frame(wave: np.ndarray, sample_rate: int, fmt: str) -> av.AudioFrame:
  if fmt == "s16":
    data = (np.clip(wave, -1, 1) * 32767).astype(np.int16)[None]
  else:
    data = wave.astype(np.float32)[None]
  frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
  frame.sample_rate = sample_rate
  frame.pts = 0
  frame.time_base = Fraction(1, sample_rate)
  return frame


def write_video(path: str, frames: list[np.ndarray], fps: int, codec: str = "mpeg4",
                audio: np.ndarray | None = None, sample_rate: int = 16000) -> None:
  """MP4 (yuv420p, `codec` mpeg4 or libx264), with an AAC mono track when `audio` is given."""
  with av.open(path, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.thread_count = 1
    if codec == "libx264":
      stream.options = {"preset": "ultrafast", "crf": "23"}
    else:
      stream.codec_context.bit_rate = 200_000
    astream = None
    if audio is not None:
      astream = container.add_stream("aac", rate=sample_rate)
      astream.layout = "mono"
      astream.codec_context.thread_count = 1
      astream.codec_context.bit_rate = 48_000
    for i, pixels in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
      frame.pts = i
      frame.time_base = Fraction(1, fps)
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
    if astream is not None:
      for packet in astream.encode(_audio_frame(audio, sample_rate, "fltp")):
        container.mux(packet)
      for packet in astream.encode(None):
        container.mux(packet)


def write_audio(path: str, wave: np.ndarray, sample_rate: int) -> None:
  """Mono MP3 (libmp3lame) or WAV (16-bit PCM), chosen by the extension."""
  mp3 = path.endswith(".mp3")
  with av.open(path, "w", format="mp3" if mp3 else "wav",
               options={"fflags": "+bitexact"}) as container:
    stream = container.add_stream("libmp3lame" if mp3 else "pcm_s16le", rate=sample_rate)
    stream.layout = "mono"
    stream.codec_context.thread_count = 1
    if mp3:
      stream.codec_context.bit_rate = 48_000
      stream.options = {"compression_level": "9"}  # LAME -q 9: twice as fast.
    for packet in stream.encode(_audio_frame(wave, sample_rate, "fltp" if mp3 else "s16")):
      container.mux(packet)
    for packet in stream.encode(None):
      container.mux(packet)


_HTML_404 = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>404 Not Found</title></head>\n"
             "<body><h1>404 Not Found</h1><p>The requested image was not found on this server.</p>"
             "<hr><address>nginx</address></body></html>\n")


def _damaged_bytes(kind: str, rng: np.random.Generator, good: bytes | None) -> bytes:
  if kind == "html_as_jpg":
    return _HTML_404.encode()
  if kind == "empty_mp4":
    return b""
  if kind == "random_bytes_mp3":
    return rng.integers(0, 256, int(rng.integers(2000, 8000)), dtype=np.uint8).tobytes()
  assert good is not None
  if kind == "truncated_jpeg":  # Header intact, scan data cut short.
    return good[:max(200, len(good) // 3)]
  if kind == "truncated_mp4":  # The index (moov, written last) is lost.
    return good[:len(good) // 2]
  raise ValueError(kind)



def make_poor_title(inst: Instance, other_cat: Category, other: Instance,
                    rng: np.random.Generator) -> str:
  """A poorly matched caption: another category's product title under this listing's brand."""
  return f"{inst.brand} {make_title(other_cat, other, rng)}"


# ---------------------------------------------------------------------------
# Precomputed features.


_FEATURE_NOISE = 0.6  # Per-listing noise; the projected latents have entries of std ~1.2.


class _FeatureSpace:
  """Fixed random projections of per-category and per-instance latents (one per seed)."""

  def __init__(self, seed: int, cats: Sequence[Category]):
    self.seed = seed
    d = FEATURE_LATENT_DIM
    rng = _rng(seed, _S_FEATURE, 1)
    scale = d ** -0.5
    self.image_proj = rng.normal(0, scale, (*IMAGE_FEATURE_SHAPE, d))  # A projection per region.
    self.video_proj = rng.normal(0, scale, (VIDEO_FEATURE_DIM, d))
    self.motion_proj = rng.normal(0, scale, (VIDEO_FEATURE_DIM, d))
    self.audio_proj = rng.normal(0, scale, (AUDIO_FEATURE_DIM, d))
    # Per category: an appearance latent and a motion direction.
    self.cat_latent = np.stack([_rng(seed, _S_FEAT_CAT, c.label).normal(0, 1, (2, d)) for c in cats])

  def latent(self, cat: Category, inst: Instance) -> np.ndarray:
    return self.cat_latent[cat.label, 0] + 0.6 * _rng(self.seed, _S_FEAT_INST, inst.index).normal(
        0, 1, FEATURE_LATENT_DIM)

  def image(self, cat: Category, inst: Instance, rng: np.random.Generator) -> np.ndarray:
    x = np.einsum("rkd,d->rk", self.image_proj, self.latent(cat, inst))
    return (x + rng.normal(0, _FEATURE_NOISE, x.shape)).astype(np.float32)

  def video(self, cat: Category, inst: Instance, rng: np.random.Generator, seconds: int) -> np.ndarray:
    """Row t: the picture plus the category's motion at second t (the motion runs over 4 s)."""
    base = self.video_proj @ self.latent(cat, inst)
    move = self.motion_proj @ self.cat_latent[cat.label, 1]
    course = 2 * np.minimum(1.0, np.arange(seconds) / 4.0) - 1
    x = base[None] + course[:, None] * move[None]
    return (x + rng.normal(0, _FEATURE_NOISE, x.shape)).astype(np.float32)

  def audio(self, cat: Category, inst: Instance, rng: np.random.Generator, seconds: int) -> np.ndarray:
    x = np.repeat((self.audio_proj @ self.latent(cat, inst))[None], seconds, axis=0)
    return (x + rng.normal(0, _FEATURE_NOISE, x.shape)).astype(np.float32)


def _save_npy(path: str, x: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, x, allow_pickle=False)


# ---------------------------------------------------------------------------
# Planning: categories, instances, items, splits.

LABEL_MODES = ("ok", "minus_one", "absent")
TITLE_MODES = ("ok", "noisy", "empty", "poor")
PV_MODES = ("ok", "empty") + _PV_MALFORMATIONS
AUDIO_KINDS = (None, "mp3", "wav", "track")
DAMAGE_MODALITIES = ("image", "video", "audio")  # Columns of Plan.damage.
_DAMAGE_CODES = tuple(DAMAGE_KINDS)  # Plan.damage holds 1 + index here; 0: intact.
_EMPTY, _NOISY, _POOR = TITLE_MODES.index("empty"), TITLE_MODES.index("noisy"), TITLE_MODES.index("poor")
_MP3, _WAV, _TRACK = 1, 2, 3


@dataclasses.dataclass
class Plan:
  """The whole set's latent structure as flat arrays: O(N) small numbers, no per-item objects.

  Instances are numbered by category (label c owns instances
  cat_start[c]:cat_start[c + 1]); their content is rebuilt on demand by
  `instance` from its own random stream. Items are in output order.
  """
  seed: int
  cats: list[Category]
  inst_category: np.ndarray  # int32 [I]
  inst_items: np.ndarray  # int32 [I] listings of each instance.
  inst_test: np.ndarray  # bool [I]
  cat_start: np.ndarray  # int64 [C + 1]
  ids: np.ndarray  # int64 [N] item ids (9 digits).
  owner: np.ndarray  # int32 [N] instance of each item.
  label_mode: np.ndarray  # int8 [N] index in LABEL_MODES.
  title_mode: np.ndarray  # int8 [N] index in TITLE_MODES.
  pv_mode: np.ndarray  # int8 [N] index in PV_MODES.
  image: np.ndarray  # bool [N]
  video: np.ndarray  # bool [N]
  h264: np.ndarray  # bool [N]
  audio: np.ndarray  # int8 [N] index in AUDIO_KINDS.
  ghost: np.ndarray  # bool [N]
  features: np.ndarray  # bool [N]
  feature_only: np.ndarray  # bool [N]
  donor: np.ndarray  # int32 [N] donor instance of the corrupted modality; -1: none.
  damage: np.ndarray  # int8 [N, 3] per DAMAGE_MODALITIES.
  corrupt_modality: str | None = None

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def is_test(self) -> np.ndarray:
    return self.inst_test[self.owner]

  def instance(self, index: int) -> Instance:
    return _make_instance(index, self.cats[int(self.inst_category[index])],
                          int(self.inst_items[index]),
                          "test" if self.inst_test[index] else "train", self.seed)

  def item(self, j: int) -> Item:
    owner = int(self.owner[j])
    it = Item(item_id=str(int(self.ids[j])), instance=owner,
              split="test" if self.inst_test[owner] else "train",
              label_mode=LABEL_MODES[self.label_mode[j]], title_mode=TITLE_MODES[self.title_mode[j]],
              pv_mode=PV_MODES[self.pv_mode[j]], image=bool(self.image[j]),
              video=bool(self.video[j]), video_codec="libx264" if self.h264[j] else "mpeg4",
              audio=AUDIO_KINDS[self.audio[j]], ghost=bool(self.ghost[j]),
              features=bool(self.features[j]), feature_only=bool(self.feature_only[j]))
    if self.donor[j] >= 0:
      it.donor[self.corrupt_modality] = int(self.donor[j])
    for col, modality in enumerate(DAMAGE_MODALITIES):
      if self.damage[j, col]:
        it.damage[modality] = _DAMAGE_CODES[self.damage[j, col] - 1]
    return it

  def items(self) -> Iterator[Item]:
    return (self.item(j) for j in range(len(self)))


def _pick(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
  """`count` entries of `pool` (kept in pool order), drawn without replacement."""
  pool = np.asarray(pool)
  count = min(count, len(pool))
  return pool[np.sort(rng.choice(len(pool), count, replace=False))] if count else pool[:0]


def _few(n: int, fraction: float, minimum_from: int = 50) -> int:
  """round(fraction * n), but at least 1 once n >= minimum_from."""
  return max(1 if n >= minimum_from else 0, int(round(fraction * n)))


def default_num_categories(num_products: int) -> int:
  """The category count used when none is given: max(8, min(40, N // 40)), at most N // 4."""
  return max(1, min(max(8, min(MAX_CATEGORIES, num_products // 40)), num_products // 4))


def _plan(num_products: int, seed: int, video_fraction: float = 0.45, audio_fraction: float = 0.45,
          damaged_fraction: float = 0.01, corrupt_modality: str | None = None,
          corrupt_fraction: float = 0.0, *, num_categories: int | None = None,
          zipf_exponent: float = 0.9, attributes_per_category: int = 3,
          multi_listing_fraction: float = 0.3, group_size_range: tuple[int, int] = (2, 4),
          caption_quality: tuple[float, float, float] = (0.9, 0.1, 0.0),
          feature_fraction: float = 0.0, feature_only_fraction: float = 0.0) -> Plan:
  """Draws the latent structure. Draws keep the order of the first version (same files)."""
  n = num_products
  rng = _rng(seed, _S_GLOBAL)
  num_cats = default_num_categories(n) if num_categories is None else num_categories
  cats = _make_categories(num_cats, rng, attributes_per_category)
  sizes = _category_sizes(n, num_cats, rng, zipf_exponent)

  # Instances: ~30% have 2-4 listings; instances are split as a whole, ~20% of
  # each category's items go to test (at least one instance when it has two).
  lo, hi = group_size_range
  inst_category, inst_items, inst_test = array("i"), array("i"), array("b")
  for cat, size in zip(cats, sizes):
    counts = array("i")
    left = int(size)
    while left > 0:
      k = int(rng.integers(lo, hi + 1)) if rng.random() < multi_listing_fraction else 1
      k = min(k, left)
      counts.append(k)
      left -= k
    order = rng.permutation(len(counts))
    test = set()
    target = round(0.2 * size)
    taken = 0
    for j in order:
      if len(counts) < 2 or len(test) == len(counts) - 1:
        break
      if taken >= target and test:
        break
      test.add(int(j))
      taken += counts[j]
    inst_category.extend([cat.label] * len(counts))
    inst_items.extend(counts)
    inst_test.extend(int(j in test) for j in range(len(counts)))
  inst_category = np.asarray(inst_category, np.int32)
  inst_items = np.asarray(inst_items, np.int32)
  inst_test = np.asarray(inst_test, bool)
  cat_start = np.concatenate([[0], np.cumsum(np.bincount(inst_category, minlength=num_cats))])

  # Items: ids are distinct 9-digit numbers, items in random order.
  owner = np.repeat(np.arange(len(inst_items), dtype=np.int32), inst_items)[rng.permutation(n)]
  ids = np.empty(0, np.int64)
  while len(ids) < n:  # First occurrences, in draw order, not drawn before.
    batch = rng.integers(100_000_000, 1_000_000_000, size=n)
    fresh = np.zeros(n, bool)
    fresh[np.unique(batch, return_index=True)[1]] = True
    fresh &= ~np.isin(batch, ids)
    ids = np.concatenate([ids, batch[fresh][:n - len(ids)]])
  is_train = ~inst_test[owner]

  # Per-item media presence.
  video, h264 = np.zeros(n, bool), np.zeros(n, bool)
  audio = np.zeros(n, np.int8)
  for j, item_id in enumerate(ids.tolist()):
    r = _rng(seed, _S_MEDIA, item_id)
    video[j] = r.random() < video_fraction
    h264[j] = r.random() < 0.25
    if r.random() < audio_fraction:
      audio[j] = _MP3 if r.random() < 0.5 else _WAV

  # The few: exact counts drawn from the global stream.
  image, ghost = np.ones(n, bool), np.zeros(n, bool)
  label_mode, title_mode, pv_mode = (np.zeros(n, np.int8) for _ in range(3))
  if n >= 200:
    ghost[_pick(rng, np.flatnonzero(is_train), 1)] = True
  image[ghost], video[ghost], audio[ghost] = False, False, 0
  title_mode[ghost], pv_mode[ghost] = _EMPTY, PV_MODES.index("empty")
  normal = np.flatnonzero(~ghost)
  image[_pick(rng, normal, _few(n, 0.015))] = False
  unlabelled = _pick(rng, np.flatnonzero(is_train & ~ghost), 2 * _few(n, 0.01))
  label_mode[unlabelled[0::2]] = LABEL_MODES.index("minus_one")
  label_mode[unlabelled[1::2]] = LABEL_MODES.index("absent")
  silent_videos = np.flatnonzero(~ghost & video & (audio == 0))
  audio[_pick(rng, silent_videos, _few(int((~ghost & video).sum()), 0.06, 20))] = _TRACK
  by_title = normal[rng.permutation(len(normal))]
  n_empty = _few(n, 0.03)
  n_noisy, n_poor = int(round(caption_quality[1] * n)), int(round(caption_quality[2] * n))
  title_mode[by_title[:n_empty]] = _EMPTY
  title_mode[by_title[n_empty:n_empty + n_noisy]] = _NOISY
  title_mode[by_title[n_empty + n_noisy:n_empty + n_noisy + n_poor]] = _POOR
  by_pv = normal[rng.permutation(len(normal))]
  n_empty = _few(n, 0.03)
  per_kind = _few(n, 0.02)
  pv_mode[by_pv[:n_empty]] = PV_MODES.index("empty")
  malformed = by_pv[n_empty:n_empty + per_kind * len(_PV_MALFORMATIONS)]
  pv_mode[malformed] = 2 + np.arange(len(malformed)) % len(_PV_MALFORMATIONS)

  # Precomputed features: a share of the items with any media (own stream).
  features, feature_only = np.zeros(n, bool), np.zeros(n, bool)
  if feature_fraction > 0:
    frng = _rng(seed, _S_FEATURE)
    pool = np.flatnonzero(~ghost & (image | video | (audio != 0)))
    chosen = _pick(frng, pool, int(round(feature_fraction * len(pool))))
    features[chosen] = True
    feature_only[_pick(frng, chosen, int(round(feature_only_fraction * len(chosen))))] = True

  # Damaged media files: ~damaged_fraction of each modality's files, at least
  # 2 per kind when n >= 200 (1 below), none when damaged_fraction is 0.
  damage = np.zeros((n, len(DAMAGE_MODALITIES)), np.int8)
  drng = _rng(seed, _S_DAMAGE)
  if damaged_fraction > 0:
    files = ~ghost & ~feature_only  # Feature-only items have no media files to damage.
    holders = {"image": np.flatnonzero(files & image),
               "video": np.flatnonzero(files & video & (audio != _TRACK)),
               "audio": np.flatnonzero(files & (audio == _MP3))}
    n_files = {"image": len(holders["image"]), "video": len(holders["video"]),
               "audio": int((files & ((audio == _MP3) | (audio == _WAV))).sum())}
    kinds_of: dict[str, list[str]] = {}
    for kind, (modality, _) in DAMAGE_KINDS.items():
      kinds_of.setdefault(modality, []).append(kind)
    for modality, kinds in kinds_of.items():
      each = max(2 if n >= 200 else 1,
                 int(round(damaged_fraction * n_files[modality] / len(kinds))))
      chosen = _pick(drng, holders[modality], each * len(kinds))
      chosen = chosen[drng.permutation(len(chosen))]
      codes = np.array([1 + _DAMAGE_CODES.index(k) for k in kinds], np.int8)
      damage[chosen, DAMAGE_MODALITIES.index(modality)] = codes[np.arange(len(chosen)) % len(kinds)]

  # Corruption: that modality's content comes from another category's instance.
  donor = np.full(n, -1, np.int32)
  if corrupt_modality is not None and corrupt_fraction > 0:
    crng = _rng(seed, _S_CORRUPT)
    has = {"text": title_mode != _EMPTY, "table": pv_mode != PV_MODES.index("empty"),
           "image": image, "video": video, "audio": audio != 0}[corrupt_modality]
    eligible = np.flatnonzero(~ghost & has)
    for j in _pick(crng, eligible, int(round(corrupt_fraction * len(eligible)))).tolist():
      own = int(inst_category[owner[j]])
      if num_cats < 2:
        continue
      c = int(crng.integers(num_cats - 1))
      c += c >= own  # The c-th category other than its own.
      donor[j] = cat_start[c] + int(crng.integers(cat_start[c + 1] - cat_start[c]))
  return Plan(seed=seed, cats=cats, inst_category=inst_category, inst_items=inst_items,
              inst_test=inst_test, cat_start=cat_start, ids=ids, owner=owner, label_mode=label_mode,
              title_mode=title_mode, pv_mode=pv_mode, image=image, video=video, h264=h264,
              audio=audio, ghost=ghost, features=features, feature_only=feature_only, donor=donor,
              damage=damage, corrupt_modality=corrupt_modality)


def _split_lists(plan: Plan, seed: int) -> dict[str, np.ndarray]:
  """Retrieval and classification id lists (item indices), drawn deterministically from test/train."""
  rng = _rng(seed, _S_GLOBAL, 1)
  is_test = plan.is_test
  test = np.flatnonzero(is_test & ~plan.ghost)
  train = np.flatnonzero(~is_test & ~plan.ghost)
  order = rng.permutation(len(test))
  query = np.zeros(len(test), bool)
  query[order[:max(1, len(test) // 4)]] = True
  # Fine: one query per test instance with several listings (its first item);
  # the gallery is every other test item (its group-mates among them).
  multi = np.flatnonzero(plan.inst_items[plan.owner[test]] > 1)
  fine = np.zeros(len(test), bool)
  fine[multi[np.unique(plan.owner[test[multi]], return_index=True)[1]]] = True
  return dict(coarse_query=test[query], coarse_gallery=test[~query], fine_query=test[fine],
              fine_gallery=test[~fine],
              cls_train=train[plan.label_mode[train] == LABEL_MODES.index("ok")], cls_test=test)



# ---------------------------------------------------------------------------
# Writing.


def _clean(output_dir: str, overwrite: bool) -> None:
  """Leaves `output_dir` without files of an earlier generated set."""
  if not os.path.isdir(output_dir):
    return
  ours = ("images", "videos", "audios", "splits", *FEATURE_DIRS.values())
  entries = [e for e in os.listdir(output_dir)
             if not (e in ours and os.path.isdir(os.path.join(output_dir, e))
                     and not os.listdir(os.path.join(output_dir, e)))]
  if not entries:
    return
  if not overwrite and not os.path.exists(os.path.join(output_dir, MARKER)):
    raise FileExistsError(
        f"{output_dir}: not empty and not a generated set ({MARKER} missing); "
        "pass overwrite=True to write there anyway")
  exts = {"images": (".jpg",), "videos": (".mp4",), "audios": (".mp3", ".wav"),
          **{sub: (".npy",) for sub in FEATURE_DIRS.values()}}
  for sub, allowed in exts.items():
    folder = os.path.join(output_dir, sub)
    if os.path.isdir(folder):
      with os.scandir(folder) as listing:  # An iterator: 1M names are never held at once.
        for entry in listing:
          if entry.name.endswith(allowed) and entry.name[:-4].isdigit():
            os.remove(entry.path)
  for name in SPLIT_LISTS:
    path = os.path.join(output_dir, "splits", f"{name}_ids.txt")
    if os.path.exists(path):
      os.remove(path)
  for name in ("train_id_label.json", "test_id_label.json", "train_id_label.jsonl",
               "test_id_label.jsonl", "fine_groups.json", MARKER):
    path = os.path.join(output_dir, name)
    if os.path.exists(path):
      os.remove(path)


def load_summary(output_dir: str) -> dict | None:
  """The marker of a complete generated set in `output_dir`: {"params", "summary"}; else None.

  Callers can skip `generate` when `params` match what they would pass
  (compare with .get: knobs added later are missing from older markers).
  """
  try:
    with open(os.path.join(output_dir, MARKER), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) and marker.get("complete") else None


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write(text)


_CHUNK = 65536  # Items per write when streaming id lists.


def _write_ids(path: str, ids: np.ndarray) -> None:
  """One id a line, streamed in chunks."""
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for s in range(0, len(ids), _CHUNK):
      f.write("".join(f"{i}\n" for i in ids[s:s + _CHUNK].tolist()))


def _write_fine_groups(path: str, plan: Plan) -> None:
  """{item_id: group}, the bytes json.dumps would give, streamed in chunks."""
  grouped = np.flatnonzero(plan.inst_items[plan.owner] > 1)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write("{")
    for s in range(0, len(grouped), _CHUNK):
      chunk = grouped[s:s + _CHUNK]
      f.write((", " if s else "") + ", ".join(
          f'"{i}": "g{g:05d}"' for i, g in zip(plan.ids[chunk].tolist(), plan.owner[chunk].tolist())))
    f.write("}")


class _SplitWriter:
  """Streams `<split>_id_label.json` (one object, as json.dumps writes it) or `.jsonl`."""

  def __init__(self, output_dir: str, split: str, jsonl: bool):
    self.jsonl = jsonl
    suffix = "jsonl" if jsonl else "json"
    self.f = open(os.path.join(output_dir, f"{split}_id_label.{suffix}"), "w", encoding="utf-8",
                  newline="\n")
    self.count = 0
    if not jsonl:
      self.f.write("{")

  def add(self, item_id: str, entry: dict) -> None:
    if self.jsonl:
      self.f.write(json.dumps({"item_id": item_id, **entry}, ensure_ascii=False) + "\n")
    else:
      self.f.write(f'{", " if self.count else ""}{json.dumps(item_id)}: '
                   f'{json.dumps(entry, ensure_ascii=False)}')
    self.count += 1

  def close(self) -> None:
    if not self.jsonl:
      self.f.write("}")
    self.f.close()


def _ordered_map(fn: Callable[[int], Any], indices: Iterable[int], num_threads: int,
                 window: int) -> Iterator[Any]:
  """map(fn, indices) in order, with at most `window` calls pending (bounded memory)."""
  if num_threads <= 1:
    yield from map(fn, indices)
    return
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending: collections.deque = collections.deque()
    try:
      for j in indices:
        pending.append(pool.submit(fn, j))
        if len(pending) >= window:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for future in pending:
        future.cancel()


def _check_fraction(name: str, value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")


def generate(output_dir: str, num_products: int, seed: int = 0, *, image_size: int = 64,
             video_fraction: float = 0.45, audio_fraction: float = 0.45,
             damaged_fraction: float = 0.01, corrupt_modality: str | None = None,
             corrupt_fraction: float = 0.0, log_every: int = 0, overwrite: bool = False,
             num_threads: int = 0, num_categories: int | None = None, zipf_exponent: float = 0.9,
             attributes_per_category: int = 3, multi_listing_fraction: float = 0.3,
             group_size_range: tuple[int, int] = (2, 4),
             caption_quality: Sequence[float] = (0.9, 0.1, 0.0), feature_fraction: float = 0.0,
             feature_only_fraction: float = 0.0, split_format: str = "auto",
             summary_list_cap: int = SUMMARY_LIST_CAP) -> dict:
  """Writes the raw M5Product layout with `num_products` items; returns a summary.

  Memory stays bounded as N grows (O(N) small arrays, streamed files, capped
  summary lists), so 1M items need no more than a few hundred MB.

  Args:
    output_dir: created if needed. If it holds files, it must hold an earlier
      generated set (marker file `.m5p_synthetic.json`), whose files are
      replaced, unless `overwrite` is set.
    num_products: number of items (>= 8).
    seed: everything is a deterministic function of the arguments.
    image_size: side of images and video frames in pixels (even, >= 16).
    video_fraction, audio_fraction: expected share of items with a video
      file / a separate audio file (independent of each other); the rest
      miss that modality.
    damaged_fraction: share of each modality's media files that are damaged.
    corrupt_modality: 'text' ('title'), 'table' ('pv'), 'image', 'video' or
      'audio': for `corrupt_fraction` of the items that have that modality,
      its content is drawn from an instance of a random other category (still
      valid media; every other modality and every other item is unchanged).
    log_every: log progress every that many items (0: only at the end).
    overwrite: write into a non-empty folder that is not a generated set.
    num_threads: items written in parallel threads (0: min(4, CPUs)); the
      output does not depend on it.
    num_categories: number of labels; None: max(8, min(40, N // 40)), at most
      N // 4. Up to 40 are named categories; 41..400 add variants of them
      (a modifier in the name and words, a hue step in the image). At most
      400 (more would repeat an image signature) and at most N.
    zipf_exponent: category sizes follow weights 1 / rank^exponent (0: equal
      sizes); every category keeps min(4, N // C) items.
    attributes_per_category: table keys per category, 1..5 (of its family's 5).
    multi_listing_fraction: share of instances (products) with several
      listings; those are the fine-grained groups.
    group_size_range: (min, max) listings of such an instance, min >= 2.
    caption_quality: shares of items with (well, partially, poorly) matched
      titles, summing to 1. Partially: half the words replaced by another
      category's words; poorly: another category's product title under the
      listing's brand. ~3% empty titles come out of the well-matched share.
    feature_fraction: share of the items with any media that also get
      precomputed `image_feature|video_feature|audio_feature/<id>.npy` for
      the modalities they have (0: none, the files are as without features).
    feature_only_fraction: share of those items whose media files are not
      written (features instead of media; never damaged).
    split_format: 'json' (one object per split), 'jsonl' (one object a line,
      with "item_id") or 'auto' (jsonl from 100,000 items on).
    summary_list_cap: per-item lists in the summary (`damaged`,
      `corrupted_items`) keep at most this many entries; counts stay exact.

  Returns:
    A JSON-serialisable dict: `splits` (items per split), `split_files`,
    `categories` (name of label i at i) and `category_sizes`, `num_instances`,
    `fine_groups`, `modalities` (file counts per modality and format, items
    without image, audio carried by videos, empty/noisy/poor titles,
    empty/malformed tables, labels -1/absent, feature files and feature-only
    items), `split_lists` (ids per list), `damaged` ([{path, item_id,
    kind}], capped; damaged files are counted in `modalities` too) with
    `damaged_count` and `damaged_by_kind`, `ghost_items` (no usable
    modality), `corrupted_items` (capped) with `corrupted_count`, and
    `seconds`. The same dict, less `output_dir` and `seconds`, is kept in the
    folder's marker file (see `load_summary`); its size does not grow with N.
  """
  if num_products < 8:
    raise ValueError(f"num_products must be >= 8, got {num_products}")
  if image_size < 16 or image_size % 2:
    raise ValueError(f"image_size must be even and >= 16, got {image_size}")
  if corrupt_modality is not None:
    if corrupt_modality not in MODALITY_ALIASES:
      raise ValueError(f"corrupt_modality must be one of {sorted(MODALITY_ALIASES)}, "
                       f"got {corrupt_modality!r}")
    corrupt_modality = MODALITY_ALIASES[corrupt_modality]
  for name, value in (("video_fraction", video_fraction), ("audio_fraction", audio_fraction),
                      ("damaged_fraction", damaged_fraction), ("corrupt_fraction", corrupt_fraction),
                      ("multi_listing_fraction", multi_listing_fraction),
                      ("feature_fraction", feature_fraction),
                      ("feature_only_fraction", feature_only_fraction)):
    _check_fraction(name, value)
  if num_categories is not None:
    limit = min(MAX_SYNTH_CATEGORIES, num_products)
    if not 1 <= num_categories <= limit:
      raise ValueError(
          f"num_categories must be in [1, {limit}], got {num_categories}: above "
          f"{MAX_SYNTH_CATEGORIES} categories would share image signatures, and every category "
          "needs at least one item")
  if not (zipf_exponent >= 0 and math.isfinite(zipf_exponent)):
    raise ValueError(f"zipf_exponent must be >= 0, got {zipf_exponent}")
  if not 1 <= attributes_per_category <= 5:
    raise ValueError(f"attributes_per_category must be in [1, 5], got {attributes_per_category}")
  group_size_range = tuple(int(g) for g in group_size_range)
  if len(group_size_range) != 2 or not 2 <= group_size_range[0] <= group_size_range[1]:
    raise ValueError(f"group_size_range must be (min, max) with 2 <= min <= max, "
                     f"got {group_size_range}")
  caption_quality = tuple(float(q) for q in caption_quality)
  if (len(caption_quality) != 3 or any(not 0 <= q <= 1 for q in caption_quality)
      or abs(sum(caption_quality) - 1) > 1e-6):
    raise ValueError("caption_quality must be 3 shares (well, partially, poorly matched) in [0, 1] "
                     f"summing to 1, got {caption_quality}")
  if split_format not in SPLIT_FORMATS:
    raise ValueError(f"split_format must be one of {SPLIT_FORMATS}, got {split_format!r}")
  if summary_list_cap < 0:
    raise ValueError(f"summary_list_cap must be >= 0, got {summary_list_cap}")
  jsonl = split_format == "jsonl" or (split_format == "auto" and num_products >= JSONL_FROM)

  start = time.perf_counter()
  plan = _plan(num_products, seed, video_fraction, audio_fraction, damaged_fraction,
               corrupt_modality, corrupt_fraction, num_categories=num_categories,
               zipf_exponent=zipf_exponent, attributes_per_category=attributes_per_category,
               multi_listing_fraction=multi_listing_fraction, group_size_range=group_size_range,
               caption_quality=caption_quality, feature_fraction=feature_fraction,
               feature_only_fraction=feature_only_fraction)
  log.info("synthetic: planned %d items, %d instances, %d categories (%.1f s)", num_products,
           len(plan.inst_items), len(plan.cats), time.perf_counter() - start)
  _clean(output_dir, overwrite)
  subs = ["images", "videos", "audios", "splits"]
  if plan.features.any():
    subs += FEATURE_DIRS.values()
  for sub in subs:
    os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
  params = dict(num_products=num_products, seed=seed, image_size=image_size,
                video_fraction=video_fraction, audio_fraction=audio_fraction,
                damaged_fraction=damaged_fraction, corrupt_modality=corrupt_modality,
                corrupt_fraction=corrupt_fraction, num_categories=num_categories,
                zipf_exponent=zipf_exponent, attributes_per_category=attributes_per_category,
                multi_listing_fraction=multi_listing_fraction,
                group_size_range=list(group_size_range), caption_quality=list(caption_quality),
                feature_fraction=feature_fraction, feature_only_fraction=feature_only_fraction,
                split_format=split_format)
  # The marker goes first, so an interrupted run is still known as ours.
  _write_text(os.path.join(output_dir, MARKER), json.dumps({"complete": False, "params": params}))

  ctx = _Context(output_dir, seed, image_size, plan,
                 _FeatureSpace(seed, plan.cats) if plan.features.any() else None)
  counts = dict(image=0, video=0, video_h264=0, audio_mp3=0, audio_wav=0, audio_in_video=0,
                audio_sr_16000=0, audio_sr_22050=0, title_empty=0, title_noisy=0, title_poor=0,
                pv_empty=0, pv_malformed=0, label_minus_one=0, label_absent=0, no_image=0,
                image_feature=0, video_feature=0, audio_feature=0, feature_only=0)
  damaged: list[dict] = []
  damaged_by_kind = {kind: 0 for kind in DAMAGE_KINDS}
  splits = {"train": 0, "test": 0}

  if num_threads <= 0:
    num_threads = min(4, os.cpu_count() or 1)
  # Items are independent (own random streams, own files), so threads change
  # nothing in the output; PyAV, Pillow and numpy release the GIL while
  # encoding. The window bounds the results held at once.
  with contextlib.ExitStack() as stack:
    writers = {}
    for split in splits:
      writers[split] = _SplitWriter(output_dir, split, jsonl)
      stack.callback(writers[split].close)
    results = _ordered_map(ctx.write, range(num_products), num_threads, 8 * num_threads)
    for done, (item_id, split, entry, item_counts, item_damaged) in enumerate(results, 1):
      writers[split].add(item_id, entry)
      splits[split] += 1
      for k, v in item_counts.items():
        counts[k] += v
      for d in item_damaged:
        damaged_by_kind[d["kind"]] += 1
        if len(damaged) < summary_list_cap:
          damaged.append(d)
      if log_every and done % log_every == 0:
        elapsed = time.perf_counter() - start
        log.info("synthetic: %d/%d items (%.1f s, %.0f items/s)", done, num_products, elapsed,
                 done / max(elapsed, 1e-9))

  # Id lists and fine groups, streamed.
  _write_fine_groups(os.path.join(output_dir, "fine_groups.json"), plan)
  lists = _split_lists(plan, seed)
  for name, idx in lists.items():
    _write_ids(os.path.join(output_dir, "splits", f"{name}_ids.txt"), plan.ids[idx])

  multi = plan.inst_items > 1
  corrupted = np.flatnonzero(plan.donor >= 0)
  summary = {
      "output_dir": output_dir,
      "num_products": num_products,
      "seed": seed,
      "image_size": image_size,
      "splits": splits,
      "split_files": "jsonl" if jsonl else "json",
      "num_categories": len(plan.cats),
      "categories": [c.name for c in plan.cats],
      "category_sizes": np.bincount(plan.inst_category[plan.owner],
                                    minlength=len(plan.cats)).tolist(),
      "num_instances": len(plan.inst_items),
      "fine_groups": int(multi.sum()),
      "fine_group_items": int(plan.inst_items[multi].sum()),
      "modalities": counts,
      "ghost_items": [str(i) for i in plan.ids[plan.ghost].tolist()],
      "split_lists": {name: len(idx) for name, idx in lists.items()},
      "damaged": damaged,
      "damaged_count": sum(damaged_by_kind.values()),
      "damaged_by_kind": damaged_by_kind,
      "corrupt_modality": corrupt_modality,
      "corrupt_fraction": corrupt_fraction,
      "corrupted_items": [str(i) for i in plan.ids[corrupted[:summary_list_cap]].tolist()],
      "corrupted_count": len(corrupted),
      "summary_list_cap": summary_list_cap,
  }
  stored = {k: v for k, v in summary.items() if k != "output_dir"}  # Same bytes wherever written.
  _write_text(os.path.join(output_dir, MARKER),
              json.dumps({"complete": True, "params": params, "summary": stored},
                         ensure_ascii=False, indent=1))
  summary["seconds"] = round(time.perf_counter() - start, 2)
  log.info("synthetic: %d items in %.1f s -> %s", num_products, summary["seconds"], output_dir)
  return summary


class _Context:
  """What writing one item needs; shared read-only by the writer threads."""

  def __init__(self, output_dir: str, seed: int, image_size: int, plan: Plan,
               features: _FeatureSpace | None):
    self.output_dir = output_dir
    self.seed = seed
    self.image_size = image_size
    self.plan = plan
    self.features = features

  def write(self, j: int) -> tuple[str, str, dict, dict, list]:
    it = self.plan.item(j)
    entry, counts, damaged = _write_item(it, self)
    return it.item_id, it.split, entry, counts, damaged


def _write_item(it: Item, ctx: _Context) -> tuple[dict, dict[str, int], list[dict]]:
  """Writes one item's media and features; returns (its split-JSON entry, counts, damaged files)."""
  plan, seed, output_dir, image_size = ctx.plan, ctx.seed, ctx.output_dir, ctx.image_size
  inst = plan.instance(it.instance)
  cat = plan.cats[inst.category]
  key = int(it.item_id)
  media = not it.feature_only
  counts: dict[str, int] = {}
  damaged = []

  def count(name: str, flag: bool = True) -> None:
    if flag:
      counts[name] = counts.get(name, 0) + 1

  def source(modality: str) -> tuple[Category, Instance]:
    """(category, instance) that a modality's content comes from."""
    if modality in it.donor:
      donor = plan.instance(it.donor[modality])
      return plan.cats[donor.category], donor
    return cat, inst

  def feature(modality: str, *args) -> None:
    """Writes the modality's feature file, from the same source as its media."""
    if it.features:
      fcat, finst = source(modality)
      frng = _rng(seed, _S_FEAT_ITEM, key, DAMAGE_MODALITIES.index(modality))
      make = getattr(ctx.features, modality)
      _save_npy(os.path.join(output_dir, FEATURE_DIRS[modality], f"{it.item_id}.npy"),
                make(fcat, finst, frng, *args))
      count(f"{modality}_feature")

  # Title and table.
  trng = _rng(seed, _S_TITLE, key)
  if it.title_mode == "empty":
    title = ""
  else:
    tcat, tinst = source("text")
    other = None
    if it.title_mode in ("noisy", "poor"):
      others = [c for c in plan.cats if c.label != tcat.label]
      other = others[int(trng.integers(len(others)))] if others else None
    if it.title_mode == "poor" and other is not None:
      lo, hi = plan.cat_start[other.label], plan.cat_start[other.label + 1]
      title = make_poor_title(tinst, other, plan.instance(int(lo + trng.integers(hi - lo))), trng)
    else:
      title = make_title(tcat, tinst, trng, other)
  pcat, pinst = source("table")
  entry: dict[str, Any] = {"title": title, "pv": make_pv(pcat, pinst, _rng(seed, _S_PV, key), it.pv_mode)}
  if it.label_mode == "ok":
    entry["label"] = cat.label
  elif it.label_mode == "minus_one":
    entry["label"] = -1
  count("title_empty", it.title_mode == "empty")
  count("title_noisy", it.title_mode == "noisy")
  count("title_poor", it.title_mode == "poor")
  count("pv_empty", it.pv_mode == "empty")
  count("pv_malformed", it.pv_mode not in ("ok", "empty"))
  count("label_minus_one", it.label_mode == "minus_one")
  count("label_absent", it.label_mode == "absent")
  count("feature_only", it.feature_only)

  # Image.
  if it.image:
    if media:
      icat, iinst = source("image")
      write_jpeg(os.path.join(output_dir, "images", f"{it.item_id}.jpg"),
                 render_image(icat, iinst, _rng(seed, _S_IMAGE, key), image_size))
      count("image")
    feature("image")
  else:
    count("no_image")

  # Audio: a separate file, or the video's sound track.
  arng = _rng(seed, _S_AUDIO, key)
  wave, sample_rate = None, 16000
  if it.audio is not None:
    sample_rate = 16000 if (it.audio == "track" or arng.random() < 0.6) else 22050
    acat, ainst = source("audio")
    audio_seconds = float(arng.uniform(2.0, 4.0))
    if media:
      wave = synth_audio(acat, ainst, arng, sample_rate, audio_seconds)
    feature("audio", max(1, math.ceil(audio_seconds)))
  if it.audio in ("mp3", "wav") and media:
    if "audio" not in it.damage:
      write_audio(os.path.join(output_dir, "audios", f"{it.item_id}.{it.audio}"), wave, sample_rate)
    count(f"audio_{it.audio}")
    count(f"audio_sr_{sample_rate}")

  # Video.
  if it.video:
    vrng = _rng(seed, _S_VIDEO, key)
    fps = 4 if vrng.random() < 0.7 else 6
    seconds = float(vrng.choice([3.5, 4.0, 4.5, 5.0]))
    if media:
      if it.damage.get("video") != "empty_mp4":
        vcat, vinst = source("video")
        frames = render_frames(vcat, vinst, vrng, image_size, int(round(seconds * fps)), fps)
        write_video(os.path.join(output_dir, "videos", f"{it.item_id}.mp4"), frames, fps,
                    it.video_codec, audio=wave if it.audio == "track" else None,
                    sample_rate=sample_rate)
      count("video")
      count("video_h264", it.video_codec == "libx264")
      count("audio_in_video", it.audio == "track")
    feature("video", math.ceil(seconds))

  # Damage replaces the file just written (or never written).
  for modality, kind in sorted(it.damage.items()):
    rel = f"{MEDIA_DIRS[modality]}/{it.item_id}{DAMAGE_KINDS[kind][1]}"
    path = os.path.join(output_dir, rel)
    good = None
    if os.path.exists(path):
      with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
      f.write(_damaged_bytes(kind, _rng(seed, _S_DAMAGE, key), good))
    damaged.append({"path": rel, "item_id": it.item_id, "kind": kind})
  return entry, counts, damaged
