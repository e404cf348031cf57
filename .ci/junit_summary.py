"""Per-file summary of a pytest JUnit XML (used by .ci/gpu): counts per test file and the first failures' messages.

    python .ci/junit_summary.py tests.xml
"""
import collections
import sys
import xml.etree.ElementTree as ET

MAX_FAILURES = 12  # listed per file


def main(path: str) -> int:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        print(f"  (no JUnit XML: {exc})")
        return 1
    counts = collections.defaultdict(collections.Counter)
    failures = collections.defaultdict(list)
    for case in root.iter("testcase"):
        name = case.get("classname", "").split(".")[-1] or "?"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                first = (child.get("message") or "").strip().splitlines()
                failures[name].append(f"{case.get('name')}: {first[0][:160] if first else child.tag}")
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[name][outcome] += 1
    for name in sorted(counts):
        c = counts[name]
        print(f"  - {name}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
        for line in failures[name][:MAX_FAILURES]:
            print(f"      FAILED {line}")
        if len(failures[name]) > MAX_FAILURES:
            print(f"      ... and {len(failures[name]) - MAX_FAILURES} more")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
