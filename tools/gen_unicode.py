"""Generates io_unicode.h: the Unicode tables io.c's tokenizer needs (Qwen3's pre-tokenizer
classes \\p{L}, \\p{N} and White_Space, and the data for NFC normalisation).

Reads these files of the Unicode Character Database (Debian's unicode-data package):
  UnicodeData.txt                 General_Category (field 2), Canonical_Combining_Class (field 3)
                                  and the canonical decompositions (field 5 without a <tag>)
  PropList.txt                    White_Space
  DerivedNormalizationProps.txt   Full_Composition_Exclusion (which composites NFC never forms)
The Unicode version is taken from the files' "# Name-X.Y.Z.txt" headers, which must agree.

    python3 tools/gen_unicode.py [UCD_DIR [OUT]]     (defaults: /usr/share/unicode, io_unicode.h
                                                      at the repository root)

The header is written atomically (a temporary file renamed over OUT). Standard library only.
Hangul syllables are left to the algorithm of Unicode section 3.12 and are not tabulated.
"""
import os
import re
import sys

UCD_DEFAULT = "/usr/share/unicode"
OUT_DEFAULT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                           "io_unicode.h"))
FILES = ("UnicodeData.txt", "PropList.txt", "DerivedNormalizationProps.txt")
LINE_MAX = 99  # characters per line, excluding the newline


def read_lines(ucd, name):
    """The lines of a UCD file with comments and blanks removed, split on ';' and stripped."""
    with open(os.path.join(ucd, name), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                yield [field.strip() for field in line.split(";")]


def file_version(ucd, name):
    """X.Y.Z from a UCD file's first line, "# Name-X.Y.Z.txt"."""
    with open(os.path.join(ucd, name), encoding="utf-8") as f:
        m = re.match(r"#\s*\S+-(\d+\.\d+\.\d+)\.txt", f.readline())
    if not m:
        sys.exit(f"gen_unicode: no version header in {name}")
    return m.group(1)


def ucd_version(ucd):
    """The one Unicode version of the files that carry a header (UnicodeData.txt has none)."""
    versions = {name: file_version(ucd, name) for name in FILES[1:]}
    if len(set(versions.values())) != 1:
        sys.exit(f"gen_unicode: files of different versions: {versions}")
    return next(iter(versions.values()))


def unicode_data(ucd):
    """(code, general category, ccc, decomposition field) for every code point UnicodeData.txt
    assigns, the "<..., First>" / "<..., Last>" pairs expanded to every code point between."""
    first = None
    for fields in read_lines(ucd, "UnicodeData.txt"):
        code, name, gc, ccc, decomp = int(fields[0], 16), fields[1], fields[2], int(fields[3]), fields[5]
        if name.endswith(", First>"):
            first = code
            continue
        if name.endswith(", Last>"):
            assert first is not None and not decomp
            for c in range(first, code + 1):
                yield c, gc, ccc, ""
            first = None
            continue
        yield code, gc, ccc, decomp


def property_codes(ucd, name, prop):
    """The set of code points a binary property file lists under prop."""
    codes = set()
    for fields in read_lines(ucd, name):
        if fields[1] != prop:
            continue
        lo, _, hi = fields[0].partition("..")
        codes.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return codes


def ranges(codes):
    """Sorted code points -> maximal inclusive ranges [(first, last)]."""
    out = []
    for c in sorted(codes):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return [tuple(r) for r in out]


def class_ranges(ccc_of):
    """{code: ccc != 0} -> maximal ranges of consecutive code points of one class."""
    out = []
    for c in sorted(ccc_of):
        if out and out[-1][1] == c - 1 and out[-1][2] == ccc_of[c]:
            out[-1][1] = c
        else:
            out.append([c, c, ccc_of[c]])
    return [tuple(r) for r in out]


def canonical_decompositions(records):
    """{code: (first, second)} for decompositions without a <tag>; second is 0 for singletons."""
    out = {}
    for code, _, _, decomp in records:
        if not decomp or decomp.startswith("<"):
            continue
        parts = [int(p, 16) for p in decomp.split()]
        assert 1 <= len(parts) <= 2, hex(code)
        out[code] = (parts[0], parts[1] if len(parts) == 2 else 0)
    return out


def primary_composites(decomps, excluded):
    """[(first, second, composite)] for two-code-point decompositions not excluded, sorted."""
    return sorted((f, s, c) for c, (f, s) in decomps.items() if s and c not in excluded)


def entry(row, decimal_last=False):
    """One initializer, "{0x41, 0x5A}"; with decimal_last the last value (a ccc) in decimal."""
    vals = [f"0x{v:X}" for v in row]
    if decimal_last:
        vals[-1] = str(row[-1])
    return "{" + ", ".join(vals) + "}"


def table(ctype, name, rows, decimal_last=False):
    """A C array definition, several entries per line, lines at most LINE_MAX long."""
    lines = [f"static const {ctype} {name}[] = {{"]
    line = "   "
    for row in rows:
        item = " " + entry(row, decimal_last) + ","
        if len(line) + len(item) > LINE_MAX:
            lines.append(line)
            line = "   "
        line += item
    return lines + [line, "};"]


def header(version, letters, numbers, white, combining, decomps, comps):
    """The text of io_unicode.h."""
    out = [
        "/* io_unicode.h - io.c's Unicode tables, generated by tools/gen_unicode.py from the Unicode",
        f" * Character Database {version} (Debian's unicode-data: {', '.join(FILES[:2])},",
        f" * {FILES[2]}). Do not edit. */",
        "#ifndef DIAMOND_IO_UNICODE_H",
        "#define DIAMOND_IO_UNICODE_H",
        "#include <stdint.h>",
        f'#define UNICODE_VERSION "{version}"',
        "typedef struct UnicodeRange { uint32_t first, last; } UnicodeRange; /* inclusive */",
    ]
    out.append("/* General_Category L (Lu Ll Lt Lm Lo), from UnicodeData.txt (the \"<..., First>\" /"
               " \"<..., Last>\"\n * range pairs expanded) */")
    out += table("UnicodeRange", "unicode_letters", letters)
    out.append("/* General_Category N (Nd Nl No) */")
    out += table("UnicodeRange", "unicode_numbers", numbers)
    out.append("/* White_Space, from PropList.txt */")
    out += table("UnicodeRange", "unicode_white_space", white)
    out.append("/* Canonical_Combining_Class != 0, as ranges of one class (ccc in decimal) */")
    out.append("typedef struct UnicodeCombining { uint32_t first, last; uint8_t ccc; } UnicodeCombining;")
    out += table("UnicodeCombining", "unicode_combining", combining, decimal_last=True)
    out.append("/* Canonical decompositions (UnicodeData field 5 without a <tag>), ONE level (not"
               " recursive):")
    out.append(" * code -> first [second]; second is 0 for a singleton. Hangul syllables are NOT"
               " listed\n * (algorithmic). */")
    out.append("typedef struct UnicodeDecomposition { uint32_t code, first, second; }"
               " UnicodeDecomposition;")
    out += table("UnicodeDecomposition", "unicode_decompositions",
                 [(c, f, s) for c, (f, s) in sorted(decomps.items())])
    out.append("/* Primary composites: (first, second) -> composite for every two-code-point"
               " canonical\n * decomposition whose composite is not Full_Composition_Exclusion"
               "\n * (DerivedNormalizationProps.txt), sorted by (first, second). */")
    out.append("typedef struct UnicodeComposition { uint32_t first, second, composite; }"
               " UnicodeComposition;")
    out += table("UnicodeComposition", "unicode_compositions", comps)
    out.append("#endif")
    return "\n".join(out) + "\n"


def write_atomically(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv):
    ucd = argv[1] if len(argv) > 1 else UCD_DEFAULT
    out = argv[2] if len(argv) > 2 else OUT_DEFAULT
    version = ucd_version(ucd)
    records = list(unicode_data(ucd))
    letters = ranges(c for c, gc, _, _ in records if gc[0] == "L")
    numbers = ranges(c for c, gc, _, _ in records if gc[0] == "N")
    white = ranges(property_codes(ucd, "PropList.txt", "White_Space"))
    combining = class_ranges({c: ccc for c, _, ccc, _ in records if ccc})
    decomps = canonical_decompositions(records)
    excluded = property_codes(ucd, "DerivedNormalizationProps.txt", "Full_Composition_Exclusion")
    comps = primary_composites(decomps, excluded)
    text = header(version, letters, numbers, white, combining, decomps, comps)
    long = [l for l in text.splitlines() if len(l) > LINE_MAX]
    assert not long, long
    write_atomically(out, text)
    print(f"gen_unicode: Unicode {version}: {len(letters)} letter, {len(numbers)} number,"
          f" {len(white)} white-space ranges, {len(combining)} combining ranges,"
          f" {len(decomps)} decompositions, {len(comps)} compositions -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
