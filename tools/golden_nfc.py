"""Writes tests/golden/nfc.txt: NFC test cases from the Unicode consortium's own
NormalizationTest.txt (an independent check of io.c's NFC, not derived from io_unicode.h).

Each test line of NormalizationTest.txt has the columns source; NFC; NFD; NFKC; NFKD. Kept are
c1 and c2 (c2 == NFC(c1)), written as "HEX HEX;HEX" (upper-case hex code points separated by
spaces, source;nfc), one case a line, after one "#" line naming the source file and version.
Cases kept: all of Part 0 (specific cases), Part 2 (canonical order) and Part 3 (PRI #29);
every 8th line of Part 1 (character by character); and every line of any part whose source has
a Hangul syllable (U+AC00..D7A3) or a conjoining jamo (U+1100..11FF). Characters not listed in
Part 1 are NFC-invariant by the file's conformance clause 2 and are not added.

    python3 tools/golden_nfc.py [UCD_DIR]     (default /usr/share/unicode; Debian's unicode-data
                                              ships NormalizationTest.txt bzip2-compressed)

Standard library only; `make golden` runs it with the other tools/golden_*.py.
"""
import bz2
import os
import re
import sys

UCD_DEFAULT = "/usr/share/unicode"
OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                    "golden", "nfc.txt"))
PART1_STRIDE = 8


def open_test_file(ucd):
    """NormalizationTest.txt or, failing that, NormalizationTest.txt.bz2, as text; and its path."""
    path = os.path.join(ucd, "NormalizationTest.txt")
    if os.path.exists(path):
        return open(path, encoding="utf-8"), path
    return bz2.open(path + ".bz2", "rt", encoding="utf-8"), path + ".bz2"


def is_hangul(code):
    return 0x1100 <= code <= 0x11FF or 0xAC00 <= code <= 0xD7A3


def parse(f):
    """(version, [(part, index in part, source, nfc)]) with source and nfc lists of code points."""
    version = re.match(r"#\s*NormalizationTest-(\d+\.\d+\.\d+)\.txt", f.readline())
    if not version:
        sys.exit("golden_nfc: no version header in NormalizationTest.txt")
    cases, part, index = [], None, 0
    for line in f:
        if line.startswith("@Part"):
            part, index = int(line[5:].split()[0]), 0
            continue
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cols = [[int(h, 16) for h in col.split()] for col in line.split(";")[:2]]
        cases.append((part, index, cols[0], cols[1]))
        index += 1
    return version.group(1), cases


def keep(part, index, source):
    return part != 1 or index % PART1_STRIDE == 0 or any(map(is_hangul, source))


def hexes(codes):
    return " ".join(f"{c:04X}" for c in codes)


def main(argv):
    ucd = argv[1] if len(argv) > 1 else UCD_DEFAULT
    f, path = open_test_file(ucd)
    with f:
        version, cases = parse(f)
    lines = [f"# source;NFC(source): columns c1;c2 of NormalizationTest-{version}.txt"
             f" ({os.path.basename(path)}): Parts 0, 2, 3, every {PART1_STRIDE}th line of Part 1,"
             " all with Hangul"]
    lines += [f"{hexes(s)};{hexes(n)}" for part, i, s, n in cases if keep(part, i, s)]
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="ascii") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, OUT)
    print(f"golden_nfc: Unicode {version}: {len(lines) - 1} of {len(cases)} cases -> {OUT}",
          file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
