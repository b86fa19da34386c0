"""Rebuild ../offline.html: DVC's plots page template with vega, vega-lite and vega-embed inlined.

DVC's own page loads the three libraries from a CDN, so `dvc plots show/diff` renders a
blank page offline. This template (`plots.html_template` in .dvc/config) carries them
inline instead. The files come from the npm registry (`npm pack`), checked against the
sha256 recorded below. Run from the repository root:

    python .dvc/plots/vendor/build.py
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE.parent / "offline.html"
# name, version, sha256 of the npm tarball, the UMD build inside it
PACKAGES = [
    ("vega", "5.33.1", "1b8504b6731c5311be3269c4d84ca996a5cc293bc772283293ede20c490e16c3",
     "package/build/vega.min.js"),
    ("vega-lite", "5.23.0", "e4cbfdd8f6f1abe381c59cd558fd6a559c12b1496bfdf2e0c3295263a40fe4da",
     "package/build/vega-lite.min.js"),
    ("vega-embed", "6.29.0", "ecf1ee709c2bac9e0a4ead6908114b05b62c71493e10a8a4308109bb070f8eb1",
     "package/build/vega-embed.min.js"),
]
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!-- Offline template (.dvc/plots/README.md): {versions} inlined, BSD-3-Clause,
     licences in .dvc/plots/vendor/. No network access is needed to render this page. -->
{inline}
<style>
body { font-family: sans-serif; }
table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def main() -> None:
    scripts, versions = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, version, sha256, member in PACKAGES:
            subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            tgz = Path(tmp) / f"{name}-{version}.tgz"
            digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
            if digest != sha256:
                sys.exit(f"{tgz.name}: sha256 {digest}, expected {sha256}")
            with tarfile.open(tgz) as tar:
                code = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
            if "</script" in code or "{plot_divs}" in code:
                sys.exit(f"{name} cannot be inlined as is")
            scripts.append(f"<script>/* {name}@{version} */\n{code.strip()}\n</script>")
            versions.append(f"{name}@{version}")
    page = PAGE.replace("{versions}", ", ".join(versions)).replace("{inline}", "\n".join(scripts))
    TEMPLATE.write_text(page, encoding="utf-8")
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size:,} bytes): {', '.join(versions)}")


if __name__ == "__main__":
    main()
