"""deploy/container: the Dockerfile and Apptainer definition are pinned and copy only paths that exist.

No container engine runs here, so the files are read, not built: every instruction is parsed (with line
continuations), every COPY / %files source must exist in the build context (the repository root) and
be let through by the Dockerfile's ignore file, the base image and every pip requirement must be pinned,
and the requirements must cover setup.cfg's install_requires.
"""
from __future__ import annotations

import configparser
import fnmatch
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTAINER = REPO / "deploy" / "container"
PINNED_BASE = re.compile(r"^pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime$")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "dangling line continuation at the end of the Dockerfile"
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker ignore semantics (last match wins; a directory pattern covers its contents)."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        parts = Path(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(pre, p) or (p.startswith("**/") and fnmatch.fnmatch(Path(pre).name, p[3:]))
               or p == "**" for pre in prefixes):
            ignored = not neg
    return ignored


def test_dockerfile_is_pinned_and_copies_existing_paths():
    text = (CONTAINER / "Dockerfile").read_text()
    ins = dockerfile_instructions(text)
    kinds = [k for k, _ in ins]
    assert kinds[0] in ("ARG", "FROM") and "FROM" in kinds and kinds[-1] in ("CMD", "ENTRYPOINT")
    assert set(kinds) <= {"ARG", "FROM", "LABEL", "ENV", "WORKDIR", "COPY", "RUN", "ENTRYPOINT", "CMD"}
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    base = next(a for k, a in ins if k == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert PINNED_BASE.match(base), f"base image not pinned to a torch/CUDA/cuDNN release: {base}"

    ignore = [ln.strip() for ln in (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    copies = [shlex.split(a) for k, a in ins if k == "COPY"]
    assert copies
    sources = [s for c in copies for s in c[:-1] if not s.startswith("--")]
    for src in sources:
        assert (REPO / src).exists(), f"COPY source {src} is not in the repository"
        assert not _ignored(src, ignore), f"COPY source {src} is excluded by Dockerfile.dockerignore"
    # The package's own files go in, including the shipped weights folder, but no byte code.
    assert "cryofastar_core" in sources and "plugin" in sources and "relion_external" in sources
    assert not _ignored("cryofastar_core/weights/default.pt", ignore)
    assert _ignored("cryofastar_core/__pycache__/job.cpython-311.pyc", ignore)
    assert _ignored("tests/test_job.py", ignore) and _ignored("runs/x", ignore)
    # torch comes only from the base image: the project is installed without resolving dependencies.
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert "pip install -r deploy/container/requirements.txt" in runs
    assert "pip install --no-deps ." in runs
    assert "shipped_weights()" in runs  # the build stops if the default weights are missing


def test_requirements_are_pinned_and_cover_setup_cfg():
    reqs = {}
    for line in (CONTAINER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\d+(\.\d+)*)", line)
        assert m, f"requirement not pinned with ==: {line}"
        reqs[m.group(1).lower()] = m.group(2)
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    needed = [re.split(r"[<>=~!; ]", r.strip(), maxsplit=1)[0].lower()
              for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    missing = [n for n in needed if n != "torch" and n not in reqs]
    assert not missing, f"setup.cfg install_requires not pinned in requirements.txt: {missing}"
    assert "torch" not in reqs  # the base image's CUDA build must not be replaced


def test_apptainer_definition_matches_the_dockerfile():
    text = (CONTAINER / "cryofastar.def").read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, flags=re.M))
    assert header["Bootstrap"] == "docker"
    docker_args = dict(a.split("=", 1) for k, a in dockerfile_instructions((CONTAINER / "Dockerfile").read_text())
                       if k == "ARG" and "=" in a)
    assert header["From"] == docker_args["BASE"], "Apptainer and Docker images must use the same base"
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", text, flags=re.M | re.S))
    assert {"files", "post", "runscript", "test"} <= set(sections)
    for line in sections["files"].splitlines():
        if line.strip() and not line.strip().startswith("#"):
            src, dst = line.split()
            assert (REPO / src).exists(), f"%files source {src} is not in the repository"
            assert dst.startswith("/opt/cryofastar/")
    assert "pip install --no-deps /opt/cryofastar" in sections["post"]
    assert "requirements.txt" in sections["post"] and "shipped_weights()" in sections["post"]
