#!/usr/bin/env bash
# Open a report page in headless Chromium and save a screenshot; fails when the page does not load
# or renders blank, so it doubles as a check that the report opens.
# Usage: scripts/screenshot_report.sh [REPORT_HTML] [PNG] [HEIGHT]
set -euo pipefail
page=${1:-runs/demo/report/index.html}
png=${2:-docs/demo_report.png}
height=${3:-2600}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $browser ]] || { echo "no chromium found (Debian: apt-get install chromium)" >&2; exit 2; }
[[ -f $page ]] || { echo "$page does not exist; run make demo or neurosens report first" >&2; exit 2; }
mkdir -p "$(dirname "$png")"
rm -f "$png"
log=$("$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,"$height" \
  --screenshot="$png" "file://$(realpath "$page")" 2>&1) || true
if grep -q "Page load failed" <<< "$log" || [[ ! -s $png ]]; then
  echo "chromium could not render $page:" >&2; echo "$log" >&2; exit 1
fi
# A page that rendered shows more than one colour in its first screenful.
"${PYTHON:-.venv/bin/python}" - "$png" <<'PY'
import sys
from matplotlib.image import imread
img = imread(sys.argv[1])[:900, :, :3]
if img.std() < 0.02:
    sys.exit(f"{sys.argv[1]}: the page rendered blank")
print(f"{sys.argv[1]}: {img.shape[1]}x{imread(sys.argv[1]).shape[0]} screenshot of a rendered page")
PY
