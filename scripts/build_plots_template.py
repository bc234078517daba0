"""Build .dvc/plots_offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

`dvc plots show/diff` writes a page that loads these libraries from a CDN; clinical machines are
often offline. This script takes the libraries' UMD builds from the npm registry (`npm pack`) and
writes a template without a `{scripts}` placeholder, so DVC adds no CDN tags. Re-run it to change
versions; the result is committed so nobody needs npm to see plots.

    python scripts/build_plots_template.py
"""
from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {  # npm package -> path of the UMD build inside the package tarball
    "vega@5.33.1": "package/build/vega.min.js",
    "vega-lite@5.23.0": "package/build/vega-lite.min.js",
    "vega-embed@6.29.0": "package/build/vega-embed.min.js",
}
OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots_offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>okdpose plots (offline)</title>
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main() -> None:
    blocks = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, member in PACKAGES.items():
            out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
            with tarfile.open(Path(tmp) / out) as tar:
                js = tar.extractfile(member).read().decode("utf-8")
            if "</script" in js:
                js = js.replace("</script", "<\\/script")
            blocks.append(f"    <!-- {spec} (BSD-3-Clause, https://vega.github.io) -->\n    <script>{js}</script>")
    # the page is a str.format template for us, but DVC fills {plot_divs}/{refresh_tag} itself
    OUT.write_text(PAGE.format(scripts="\n".join(blocks)))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
