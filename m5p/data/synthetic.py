"""A synthetic M5Product: the raw layout of shared/M5PRODUCT_LAYOUT.md, with real media.

`generate(output_dir, num_products, seed)` writes `train_id_label.json`,
`test_id_label.json`, `images/<id>.jpg`, `videos/<id>.mp4`,
`audios/<id>.mp3|.wav`, `splits/*_ids.txt` and `fine_groups.json`, so the
demo goes through the same converter as the real dataset.

Latent structure (what a model can learn from it):

* Categories (the label): C = max(8, min(40, N // 40)) of 40 named e-commerce
  categories (e.g. '运动鞋 sneakers') in 9 families (shoes, clothing, ...),
  with Zipf-like sizes (weights 1 / rank^0.9). Each category has
  - image: an object shape (8 kinds) on a background pattern (5 kinds) of a
    category hue (10 hues); no two categories share (shape, pattern);
  - video: the same picture, the object moving in one of 7 category motions
    (right, left, down, up, grow, shrink, orbit) over 4 s, in clips of
    3.5-5 s at 4 or 6 fps (mpeg4, a quarter h264);
  - audio: beeps at a category pitch (10 steps of 4 semitones, 250-2000 Hz),
    tempo (4 rates) and chord (3 kinds); (pitch, tempo) is unique;
  - title: its Chinese and English names and 4 + 2 category words;
  - table: 3 category-chosen keys of its family (shoes: 尺码, 鞋面材质...)
    with category-preferred values, and a category style word (款式).
* Instances (products): brand, model number, main colour, second colour,
  stripe count, object size/offset, attribute values and a variant (0-3).
  About 30% of instances have 2-4 listings (items); those form the fine
  groups (`fine_groups.json`). Listings of one instance share all of the
  above and differ in title word order and optional words, table order and
  dropped keys, image jitter (shift, scale, brightness, noise), video
  duration/frame rate and audio phase, noise, length and sample rate.
* Complementary cues: brand in title, table and an image badge colour;
  model number in title and table; main colour in image, video, table and
  often title; stripes and second colour only in image and video; the
  variant only in video (number of dots) and audio (a second note).
* Splits: products (all their listings) go to test for ~20% of each
  category's items, the rest to train; the retrieval and classification id
  lists are drawn from them (`_split_lists`).
* Noise: ~10% titles mixed with another category's words, ~3% empty titles,
  ~3% empty tables and ~10% malformed tables (pairs without '#:#', empty keys
  or values, stray separators, repeated keys); a few train items with label
  -1 or no label key; a few items without an image; a few videos carry the
  item's sound as an audio track instead of a separate audio file; about
  `damaged_fraction` of media files are damaged (undecodable); from 200
  items on, one train item has no usable modality at all.

Everything is deterministic per seed: per-item content comes from random
streams keyed by (seed, stream, id), so `corrupt_modality` changes only that
modality's content, and the same seed gives byte-identical files (PyAV's
encoders run single-threaded with fixed options; Pillow JPEG is
deterministic).
"""
from __future__ import annotations

import colorsys
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
import time
from fractions import Fraction
from typing import Any

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
SPLIT_LISTS = ("coarse_query", "coarse_gallery", "fine_query", "fine_gallery", "cls_train", "cls_test")

# Random streams (the second element of every seed sequence).
_S_GLOBAL, _S_INSTANCE, _S_TITLE, _S_PV, _S_IMAGE, _S_VIDEO, _S_AUDIO, _S_MEDIA, _S_DAMAGE, _S_CORRUPT = range(10)


def _rng(seed: int, stream: int, key: int = 0) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, stream, key]))


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
  keys: tuple[str, ...]  # Table keys of this category (3 of its family's 5).
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
  item_id: str
  instance: int
  split: str
  label_mode: str = "ok"  # 'ok' | 'minus_one' | 'absent'
  title_mode: str = "ok"  # 'ok' | 'noisy' | 'empty'
  pv_mode: str = "ok"  # 'ok' | 'empty' | a malformation kind
  image: bool = True
  video: bool = False
  video_codec: str = "mpeg4"
  audio: str | None = None  # None | 'mp3' | 'wav' | 'track' (sound track of the video)
  ghost: bool = False  # No usable modality at all.
  donor: dict = dataclasses.field(default_factory=dict)  # corrupted modality -> donor instance
  damage: dict = dataclasses.field(default_factory=dict)  # modality -> damage kind


def _make_categories(num: int, rng: np.random.Generator) -> list[Category]:
  chosen = rng.permutation(MAX_CATEGORIES)[:num]
  cats = []
  for label, pool_index in enumerate(chosen):
    zh, en, family, words_zh, words_en = CATEGORY_POOL[int(pool_index)]
    fam = FAMILIES[family]
    key_names = list(fam["keys"])
    keys = tuple(key_names[i] for i in sorted(rng.choice(len(key_names), 3, replace=False)))
    preferred = {}
    for k in keys:
      vocab = fam["keys"][k]
      n = min(len(vocab), int(rng.integers(2, 4)))
      preferred[k] = tuple(vocab[i] for i in rng.choice(len(vocab), n, replace=False))
    brands = tuple(fam["brands"][i] for i in rng.choice(len(fam["brands"]), 4, replace=False))
    palette = tuple(int(i) for i in rng.choice(len(COLOURS), 4, replace=False))
    a, b = divmod(label, 8)
    c, d = divmod(label, 10)
    cats.append(Category(
        label=label, zh=zh, en=en, family=family, words_zh=words_zh, words_en=words_en,
        keys=keys, preferred=preferred, brands=brands, palette=palette,
        shape=SHAPES[b], pattern=PATTERNS[(a + b) % len(PATTERNS)],
        hue=((3 * label) % NUM_HUES) / NUM_HUES, motion=MOTIONS[label % len(MOTIONS)],
        pitch_hz=PITCHES_HZ[(3 * d) % len(PITCHES_HZ)], tempo=TEMPOS[(c + d) % len(TEMPOS)],
        chord=CHORDS[label % len(CHORDS)]))
  return cats


def _category_sizes(n: int, c: int, rng: np.random.Generator) -> np.ndarray:
  """Zipf-like sizes summing to n, each >= min(4, n // c), in a random label order."""
  weights = 1.0 / np.arange(1, c + 1) ** 0.9
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


# ---------------------------------------------------------------------------
# Planning: categories, instances, items, splits.


def _pick(rng: np.random.Generator, pool: list, count: int) -> list:
  count = min(count, len(pool))
  return [pool[i] for i in sorted(rng.choice(len(pool), count, replace=False))] if count else []


def _few(n: int, fraction: float, minimum_from: int = 50) -> int:
  """round(fraction * n), but at least 1 once n >= minimum_from."""
  return max(1 if n >= minimum_from else 0, int(round(fraction * n)))


def _plan(num_products: int, seed: int, video_fraction: float, audio_fraction: float,
          damaged_fraction: float, corrupt_modality: str | None, corrupt_fraction: float):
  n = num_products
  rng = _rng(seed, _S_GLOBAL)
  num_cats = max(8, min(MAX_CATEGORIES, n // 40))
  num_cats = max(1, min(num_cats, n // 4))
  cats = _make_categories(num_cats, rng)
  sizes = _category_sizes(n, num_cats, rng)

  # Instances: ~30% have 2-4 listings; instances are split as a whole, ~20% of
  # each category's items go to test (at least one instance when it has two).
  instances: list[Instance] = []
  for cat, size in zip(cats, sizes):
    counts = []
    left = int(size)
    while left > 0:
      k = int(rng.integers(2, 5)) if rng.random() < 0.3 else 1
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
    for j, k in enumerate(counts):
      instances.append(_make_instance(len(instances), cat, k, "test" if j in test else "train", seed))

  # Items: ids are distinct 9-digit strings, items in random order.
  owners = [inst.index for inst in instances for _ in range(inst.num_items)]
  owners = [owners[i] for i in rng.permutation(len(owners))]
  ids: list[int] = []
  seen = set()
  while len(ids) < n:
    for x in rng.integers(100_000_000, 1_000_000_000, size=n):
      if int(x) not in seen and len(ids) < n:
        seen.add(int(x))
        ids.append(int(x))
  items = [Item(item_id=str(i), instance=o, split=instances[o].split) for i, o in zip(ids, owners)]
  train = [it for it in items if it.split == "train"]

  # Per-item media presence.
  for it in items:
    r = _rng(seed, _S_MEDIA, int(it.item_id))
    it.video = bool(r.random() < video_fraction)
    it.video_codec = "libx264" if r.random() < 0.25 else "mpeg4"
    if r.random() < audio_fraction:
      it.audio = "mp3" if r.random() < 0.5 else "wav"

  # The few: exact counts drawn from the global stream.
  ghosts = _pick(rng, train, 1) if n >= 200 else []
  for it in ghosts:
    it.ghost, it.image, it.video, it.audio = True, False, False, None
    it.title_mode, it.pv_mode = "empty", "empty"
  normal = [it for it in items if not it.ghost]
  for it in _pick(rng, normal, _few(n, 0.015)):
    it.image = False
  unlabelled = _pick(rng, [it for it in train if not it.ghost], 2 * _few(n, 0.01))
  for j, it in enumerate(unlabelled):
    it.label_mode = "minus_one" if j % 2 == 0 else "absent"
  silent_videos = [it for it in normal if it.video and it.audio is None]
  for it in _pick(rng, silent_videos, _few(len([i for i in normal if i.video]), 0.06, 20)):
    it.audio = "track"
  by_title = [normal[i] for i in rng.permutation(len(normal))]
  n_empty, n_noisy = _few(n, 0.03), int(round(0.10 * n))
  for it in by_title[:n_empty]:
    it.title_mode = "empty"
  for it in by_title[n_empty:n_empty + n_noisy]:
    it.title_mode = "noisy"
  by_pv = [normal[i] for i in rng.permutation(len(normal))]
  n_empty = _few(n, 0.03)
  per_kind = _few(n, 0.02)
  for it in by_pv[:n_empty]:
    it.pv_mode = "empty"
  for j, it in enumerate(by_pv[n_empty:n_empty + per_kind * len(_PV_MALFORMATIONS)]):
    it.pv_mode = _PV_MALFORMATIONS[j % len(_PV_MALFORMATIONS)]

  # Damaged media files: ~damaged_fraction of each modality's files, at least
  # 2 per kind when n >= 200 (1 below), none when damaged_fraction is 0.
  drng = _rng(seed, _S_DAMAGE)
  if damaged_fraction > 0:
    holders = {
        "image": [it for it in normal if it.image],
        "video": [it for it in normal if it.video and it.audio != "track"],
        "audio": [it for it in normal if it.audio == "mp3"],
    }
    n_files = {"image": len(holders["image"]), "video": len(holders["video"]),
               "audio": len([it for it in normal if it.audio in ("mp3", "wav")])}
    kinds_of = {}
    for kind, (modality, _) in DAMAGE_KINDS.items():
      kinds_of.setdefault(modality, []).append(kind)
    for modality, kinds in kinds_of.items():
      each = max(2 if n >= 200 else 1,
                 int(round(damaged_fraction * n_files[modality] / len(kinds))))
      chosen = _pick(drng, holders[modality], each * len(kinds))
      chosen = [chosen[i] for i in drng.permutation(len(chosen))]
      for j, it in enumerate(chosen):
        it.damage[modality] = kinds[j % len(kinds)]

  # Corruption: that modality's content comes from another category's instance.
  if corrupt_modality is not None and corrupt_fraction > 0:
    crng = _rng(seed, _S_CORRUPT)
    by_cat: dict[int, list[int]] = {}
    for inst in instances:
      by_cat.setdefault(inst.category, []).append(inst.index)
    has = {"text": lambda it: it.title_mode != "empty", "table": lambda it: it.pv_mode != "empty",
           "image": lambda it: it.image, "video": lambda it: it.video,
           "audio": lambda it: it.audio is not None}[corrupt_modality]
    eligible = [it for it in normal if has(it)]
    for it in _pick(crng, eligible, int(round(corrupt_fraction * len(eligible)))):
      own = instances[it.instance].category
      other = [c for c in by_cat if c != own]
      if not other:
        continue
      c = other[int(crng.integers(len(other)))]
      it.donor[corrupt_modality] = by_cat[c][int(crng.integers(len(by_cat[c])))]
  return cats, instances, items


# ---------------------------------------------------------------------------
# Writing.


def _clean(output_dir: str, overwrite: bool) -> None:
  """Leaves `output_dir` without files of an earlier generated set."""
  if not os.path.isdir(output_dir):
    return
  ours = ("images", "videos", "audios", "splits")
  entries = [e for e in os.listdir(output_dir)
             if not (e in ours and os.path.isdir(os.path.join(output_dir, e))
                     and not os.listdir(os.path.join(output_dir, e)))]
  if not entries:
    return
  if not overwrite and not os.path.exists(os.path.join(output_dir, MARKER)):
    raise FileExistsError(
        f"{output_dir}: not empty and not a generated set ({MARKER} missing); "
        "pass overwrite=True to write there anyway")
  exts = {"images": (".jpg",), "videos": (".mp4",), "audios": (".mp3", ".wav")}
  for sub, allowed in exts.items():
    folder = os.path.join(output_dir, sub)
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.endswith(allowed) and name[:-4].isdigit():
          os.remove(os.path.join(folder, name))
  for name in SPLIT_LISTS:
    path = os.path.join(output_dir, "splits", f"{name}_ids.txt")
    if os.path.exists(path):
      os.remove(path)
  for name in ("train_id_label.json", "test_id_label.json", "fine_groups.json", MARKER):
    path = os.path.join(output_dir, name)
    if os.path.exists(path):
      os.remove(path)


def load_summary(output_dir: str) -> dict | None:
  """The marker of a complete generated set in `output_dir`: {"params", "summary"}; else None.

  Callers can skip `generate` when `params` match what they would pass.
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


def generate(output_dir: str, num_products: int, seed: int = 0, *, image_size: int = 64,
             video_fraction: float = 0.45, audio_fraction: float = 0.45,
             damaged_fraction: float = 0.01, corrupt_modality: str | None = None,
             corrupt_fraction: float = 0.0, log_every: int = 0, overwrite: bool = False,
             num_threads: int = 0) -> dict:
  """Writes the raw M5Product layout with `num_products` items; returns a summary.

  Args:
    output_dir: created if needed. If it holds files, it must hold an earlier
      generated set (marker file `.m5p_synthetic.json`), whose files are
      replaced, unless `overwrite` is set.
    num_products: number of items (>= 8).
    seed: everything is a deterministic function of the arguments.
    image_size: side of images and video frames in pixels (even, >= 16).
    video_fraction, audio_fraction: expected share of items with a video
      file / a separate audio file (independent of each other).
    damaged_fraction: share of each modality's media files that are damaged.
    corrupt_modality: 'text' ('title'), 'table' ('pv'), 'image', 'video' or
      'audio': for `corrupt_fraction` of the items that have that modality,
      its content is drawn from an instance of a random other category (still
      valid media; every other modality and every other item is unchanged).
    log_every: log progress every that many items (0: only at the end).
    overwrite: write into a non-empty folder that is not a generated set.
    num_threads: items written in parallel threads (0: min(4, CPUs)); the
      output does not depend on it.

  Returns:
    A JSON-serialisable dict: `splits` (items per split), `categories`
    (name of label i at i) and `category_sizes`, `num_instances`,
    `fine_groups`, `modalities` (file counts per modality and format, items
    without image, audio carried by videos, empty/noisy titles,
    empty/malformed tables, labels -1/absent), `split_lists` (ids per list),
    `damaged` ([{path, item_id, kind}]; damaged files are counted in
    `modalities` too), `ghost_items` (no usable modality), `corrupted_items`
    and `seconds`. The same dict, less `output_dir` and `seconds`, is kept in
    the folder's marker file (see `load_summary`).
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
                      ("damaged_fraction", damaged_fraction), ("corrupt_fraction", corrupt_fraction)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {value}")
  start = time.perf_counter()
  cats, instances, items = _plan(num_products, seed, video_fraction, audio_fraction,
                                 damaged_fraction, corrupt_modality, corrupt_fraction)
  _clean(output_dir, overwrite)
  for sub in ("images", "videos", "audios", "splits"):
    os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
  params = dict(num_products=num_products, seed=seed, image_size=image_size,
                video_fraction=video_fraction, audio_fraction=audio_fraction,
                damaged_fraction=damaged_fraction, corrupt_modality=corrupt_modality,
                corrupt_fraction=corrupt_fraction)
  # The marker goes first, so an interrupted run is still known as ours.
  _write_text(os.path.join(output_dir, MARKER), json.dumps({"complete": False, "params": params}))

  cats_by_label = {c.label: c for c in cats}
  labels: dict[str, dict] = {"train": {}, "test": {}}
  damaged = []
  counts = dict(image=0, video=0, video_h264=0, audio_mp3=0, audio_wav=0, audio_in_video=0,
                audio_sr_16000=0, audio_sr_22050=0, title_empty=0, title_noisy=0, pv_empty=0,
                pv_malformed=0, label_minus_one=0, label_absent=0, no_image=0)

  def work(it: Item):
    return _write_item(it, output_dir, seed, image_size, cats_by_label, instances)

  if num_threads <= 0:
    num_threads = min(4, os.cpu_count() or 1)
  # Items are independent (own random streams, own files), so threads change
  # nothing in the output; PyAV, Pillow and numpy release the GIL while encoding.
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    results = pool.map(work, items) if num_threads > 1 else map(work, items)
    for done, (it, (entry, item_counts, item_damaged)) in enumerate(zip(items, results), 1):
      labels[it.split][it.item_id] = entry
      for k, v in item_counts.items():
        counts[k] += v
      damaged += item_damaged
      if log_every and done % log_every == 0:
        log.info("synthetic: %d/%d items (%.1f s)", done, len(items), time.perf_counter() - start)

  # Splits: JSON per split, id lists and fine groups.
  for split, entries in labels.items():
    _write_text(os.path.join(output_dir, f"{split}_id_label.json"),
                json.dumps(entries, ensure_ascii=False))
  fine_groups = {it.item_id: f"g{it.instance:05d}" for it in items if instances[it.instance].num_items > 1}
  _write_text(os.path.join(output_dir, "fine_groups.json"), json.dumps(fine_groups, ensure_ascii=False))
  lists = _split_lists(items, instances, seed)
  for name, ids in lists.items():
    _write_text(os.path.join(output_dir, "splits", f"{name}_ids.txt"), "".join(f"{i}\n" for i in ids))

  group_sizes = [inst.num_items for inst in instances if inst.num_items > 1]
  summary = {
      "output_dir": output_dir,
      "num_products": num_products,
      "seed": seed,
      "image_size": image_size,
      "splits": {s: len(e) for s, e in labels.items()},
      "num_categories": len(cats),
      "categories": [c.name for c in cats],
      "category_sizes": [int(sum(inst.num_items for inst in instances if inst.category == c.label))
                         for c in cats],
      "num_instances": len(instances),
      "fine_groups": len(group_sizes),
      "fine_group_items": int(sum(group_sizes)),
      "modalities": counts,
      "ghost_items": [it.item_id for it in items if it.ghost],
      "split_lists": {name: len(ids) for name, ids in lists.items()},
      "damaged": damaged,
      "corrupt_modality": corrupt_modality,
      "corrupt_fraction": corrupt_fraction,
      "corrupted_items": [it.item_id for it in items if it.donor],
  }
  stored = {k: v for k, v in summary.items() if k != "output_dir"}  # Same bytes wherever written.
  _write_text(os.path.join(output_dir, MARKER),
              json.dumps({"complete": True, "params": params, "summary": stored},
                         ensure_ascii=False, indent=1))
  summary["seconds"] = round(time.perf_counter() - start, 2)
  log.info("synthetic: %d items in %.1f s -> %s", len(items), summary["seconds"], output_dir)
  return summary


def _write_item(it: Item, output_dir: str, seed: int, image_size: int,
                cats_by_label: dict[int, Category], instances: list[Instance]):
  """Writes one item's media; returns (its split-JSON entry, counts, damaged files)."""
  inst = instances[it.instance]
  cat = cats_by_label[inst.category]
  key = int(it.item_id)
  counts: dict[str, int] = {}
  damaged = []

  def count(name: str, flag: bool = True) -> None:
    if flag:
      counts[name] = counts.get(name, 0) + 1

  def source(modality: str) -> tuple[Category, Instance]:
    """(category, instance) that a modality's content comes from."""
    if modality in it.donor:
      donor = instances[it.donor[modality]]
      return cats_by_label[donor.category], donor
    return cat, inst

  # Title and table.
  trng = _rng(seed, _S_TITLE, key)
  if it.title_mode == "empty":
    title = ""
  else:
    tcat, tinst = source("text")
    noise = None
    if it.title_mode == "noisy":
      others = [c for c in cats_by_label.values() if c.label != tcat.label]
      noise = others[int(trng.integers(len(others)))] if others else None
    title = make_title(tcat, tinst, trng, noise)
  pcat, pinst = source("table")
  entry: dict[str, Any] = {"title": title, "pv": make_pv(pcat, pinst, _rng(seed, _S_PV, key), it.pv_mode)}
  if it.label_mode == "ok":
    entry["label"] = cat.label
  elif it.label_mode == "minus_one":
    entry["label"] = -1
  count("title_empty", it.title_mode == "empty")
  count("title_noisy", it.title_mode == "noisy")
  count("pv_empty", it.pv_mode == "empty")
  count("pv_malformed", it.pv_mode not in ("ok", "empty"))
  count("label_minus_one", it.label_mode == "minus_one")
  count("label_absent", it.label_mode == "absent")

  # Image.
  if it.image:
    icat, iinst = source("image")
    write_jpeg(os.path.join(output_dir, "images", f"{it.item_id}.jpg"),
               render_image(icat, iinst, _rng(seed, _S_IMAGE, key), image_size))
    count("image")
  else:
    count("no_image")

  # Audio: a separate file, or the video's sound track.
  arng = _rng(seed, _S_AUDIO, key)
  wave, sample_rate = None, 16000
  if it.audio is not None:
    sample_rate = 16000 if (it.audio == "track" or arng.random() < 0.6) else 22050
    acat, ainst = source("audio")
    wave = synth_audio(acat, ainst, arng, sample_rate, float(arng.uniform(2.0, 4.0)))
  if it.audio in ("mp3", "wav"):
    if "audio" not in it.damage:
      write_audio(os.path.join(output_dir, "audios", f"{it.item_id}.{it.audio}"), wave, sample_rate)
    count(f"audio_{it.audio}")
    count(f"audio_sr_{sample_rate}")

  # Video.
  if it.video:
    vrng = _rng(seed, _S_VIDEO, key)
    fps = 4 if vrng.random() < 0.7 else 6
    seconds = float(vrng.choice([3.5, 4.0, 4.5, 5.0]))
    if it.damage.get("video") != "empty_mp4":
      vcat, vinst = source("video")
      frames = render_frames(vcat, vinst, vrng, image_size, int(round(seconds * fps)), fps)
      write_video(os.path.join(output_dir, "videos", f"{it.item_id}.mp4"), frames, fps,
                  it.video_codec, audio=wave if it.audio == "track" else None,
                  sample_rate=sample_rate)
    count("video")
    count("video_h264", it.video_codec == "libx264")
    count("audio_in_video", it.audio == "track")

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


def _split_lists(items: list[Item], instances: list[Instance], seed: int) -> dict[str, list[str]]:
  """Retrieval and classification id lists, drawn deterministically from test/train."""
  rng = _rng(seed, _S_GLOBAL, 1)
  test = [it for it in items if it.split == "test" and not it.ghost]
  train = [it for it in items if it.split == "train" and not it.ghost]
  order = rng.permutation(len(test))
  n_query = max(1, len(test) // 4)
  query = {test[i].item_id for i in order[:n_query]}
  coarse_query = [it.item_id for it in test if it.item_id in query]
  coarse_gallery = [it.item_id for it in test if it.item_id not in query]
  # Fine: one query per test instance with several listings; the gallery is
  # every other test item (its group-mates among them).
  first: dict[int, str] = {}
  for it in test:
    if instances[it.instance].num_items > 1:
      first.setdefault(it.instance, it.item_id)
  fine_query = [it.item_id for it in test if first.get(it.instance) == it.item_id]
  fq = set(fine_query)
  fine_gallery = [it.item_id for it in test if it.item_id not in fq]
  cls_train = [it.item_id for it in train if it.label_mode == "ok"]
  cls_test = [it.item_id for it in test]
  return dict(coarse_query=coarse_query, coarse_gallery=coarse_gallery, fine_query=fine_query,
              fine_gallery=fine_gallery, cls_train=cls_train, cls_test=cls_test)
