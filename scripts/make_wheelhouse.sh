#!/usr/bin/env bash
# Build an offline wheelhouse for a GPU node that already has torch, triton and transformers but no package index.
#
#   bash scripts/make_wheelhouse.sh [DIR]          # default DIR: wheelhouse/ (git-ignored)
#
# On the node (see docs/GPU.md):
#   pip install --no-index --find-links DIR -e '.[test]'
#
# What lands in DIR: a wheel for every package kvcompress (pyproject dependencies + the `test` extra) needs on the
# node beyond what the node's torch / triton / transformers already brought, for CPython $PYVER on $PLATFORM;
# setuptools + wheel + their dependencies (for the editable install's isolated build); requirements.txt (the pins of DIR) and
# node-pins.txt (what the node is assumed to have: torch, triton, transformers and their non-CUDA dependencies).
#
# How: (1) source-only packages (antlr4-python3-runtime 4.9.3, rouge-score 0.1.2) are built with `pip wheel --no-deps`;
# (2) torch and triton are replaced by metadata-only stub wheels (their real requirements minus nvidia-* / cuda-*),
# so nothing CUDA-sized is downloaded; (3) pip resolves, for the target platform, once the node's packages alone (A)
# and once A plus kvcompress's requirements (B); (4) every (name, version) of B not in A is downloaded;
# (5) a check resolves the requirements again with --no-index against DIR plus stubs of A: it fails if DIR is
# incomplete. Environment overrides: PYTHON, PYVER (3.12), PLATFORM (manylinux_2_28_x86_64: accepts manylinux2014
# wheels too; torch 2.11 itself needs glibc 2.28), NODE_PINS ("torch==2.11.* triton==3.6.* transformers==5.17.*").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=$(mkdir -p "${1:-wheelhouse}" && cd "${1:-wheelhouse}" && pwd)
PYVER=${PYVER:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
read -r -a NODE_PINS <<<"${NODE_PINS:-torch==2.11.* triton==3.6.* transformers==5.17.*}"
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3 rouge-score==0.1.2)
STUBBED="torch triton"  # binary giants the node has; everything else of A is resolved for real
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# older pips do not expand manylinux_2_X to the glibc versions below it: list them (2_17 = manylinux2014)
TARGET=(--python-version "$PYVER" --implementation cp --only-binary=:all: --platform "$PLATFORM")
if [[ $PLATFORM =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
  for ((minor = BASH_REMATCH[1] - 1; minor >= 5; minor--)); do TARGET+=(--platform "manylinux_2_${minor}_${BASH_REMATCH[2]}"); done
  TARGET+=(--platform "manylinux2014_${BASH_REMATCH[2]}" --platform "manylinux2010_${BASH_REMATCH[2]}")
fi
PIP=("$PY" -m pip --disable-pip-version-check)
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }  # noise from file:// extra indexes

# kvcompress's requirements (minus the node's packages) + the test extra + build tools for `pip install -e .`
"$PY" - "$WORK/kv-reqs.txt" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["test"] + ["setuptools>=68", "wheel"]
node = {"torch", "triton", "transformers"}
keep = [r for r in reqs if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() not in node]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
EOF
printf '%s\n' "${NODE_PINS[@]}" >"$WORK/node-reqs.txt"

echo "== 1/5 building source-only wheels: ${SOURCE_ONLY[*]}"
"${PIP[@]}" wheel -q --no-deps -w "$DIR" "${SOURCE_ONLY[@]}" 2>&1 | quiet

echo "== 2/5 stub wheels for $STUBBED (real requirements, minus nvidia-*/cuda-*)"
"${PIP[@]}" install -q --dry-run --no-deps --ignore-installed --target "$WORK/t" "${TARGET[@]}" \
  --report "$WORK/pins.json" -r "$WORK/node-reqs.txt" 2>&1 | quiet
mkdir -p "$WORK/stubs" "$WORK/node"
# stub_wheels.py REPORT OUTDIR NAMES LOCAL KEEPDEPS: one dependency-less (or metadata-only) py3-none-any wheel per
# package of a pip --report; LOCAL appends a local version label so the stub outranks the real index release.
cat >"$WORK/stub_wheels.py" <<'EOF'
import base64, hashlib, json, re, sys, zipfile
report, outdir, names, local, keepdeps = sys.argv[1:6]
names = set(names.split()) if names != "*" else None
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    name, version = meta["name"], meta["version"]
    if names is not None and name.lower() not in names:
        continue
    version += local
    reqs = [r for r in meta.get("requires_dist") or [] if not re.match(r"(nvidia-|cuda-)", r)] if keepdeps == "1" else []
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in reqs),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: kvcompress-stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(t.encode())}\n" for p, t in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(f"{outdir}/{dist}-py3-none-any.whl", "w") as zf:
        for p, t in {**files, f"{dist}.dist-info/RECORD": record}.items():
            zf.writestr(p, t)
EOF
"$PY" "$WORK/stub_wheels.py" "$WORK/pins.json" "$WORK/stubs" "$STUBBED" "+nodestub" 1

echo "== 3/5 resolving for CPython $PYVER / $PLATFORM: node packages (A), then A + kvcompress (B)"
RESOLVE=("${PIP[@]}" install -q --dry-run --ignore-installed --target "$WORK/t" "${TARGET[@]}" --find-links "$DIR"
         --find-links "$WORK/stubs")
"${RESOLVE[@]}" --report "$WORK/a.json" -r "$WORK/node-reqs.txt" 2>&1 | quiet
"${RESOLVE[@]}" --report "$WORK/b.json" -r "$WORK/node-reqs.txt" -r "$WORK/kv-reqs.txt" 2>&1 | quiet
# pip builds the editable install in an isolated env that cannot see the node's packages: it needs setuptools,
# wheel and their dependencies from DIR, at B's versions
"$PY" - "$WORK/b.json" >"$WORK/b-pins.txt" <<'EOF'
import json, sys
print("".join(f"{i['metadata']['name']}=={i['metadata']['version']}\n" for i in json.load(open(sys.argv[1]))["install"]))
EOF
"${RESOLVE[@]}" --report "$WORK/build.json" -c "$WORK/b-pins.txt" setuptools wheel 2>&1 | quiet
"$PY" - "$WORK" "$DIR" <<'EOF'
import json, re, sys
work, out = sys.argv[1:3]
pins = lambda f: {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
                  for i in json.load(open(f"{work}/{f}"))["install"]}
a, b, build = pins("a.json"), pins("b.json"), pins("build.json")
need = {n: v for n, v in b.items() if a.get(n) != v or n in build}
open(f"{out}/requirements.txt", "w").write("".join(f"{n}=={v}\n" for n, v in sorted(need.items())))
open(f"{out}/node-pins.txt", "w").write("".join(f"{n}=={v.removesuffix('+nodestub')}\n" for n, v in sorted(a.items())))
print(f"   node (A): {len(a)} packages; wheelhouse: {len(need)} packages")
EOF

echo "== 4/5 downloading binary wheels"
"${PIP[@]}" download -q --no-deps "${TARGET[@]}" --find-links "$DIR" -d "$DIR" -r "$DIR/requirements.txt" 2>&1 | quiet

echo "== 5/5 checking: requirements resolve with --no-index against $DIR + stubs of node-pins.txt"
"$PY" "$WORK/stub_wheels.py" "$WORK/a.json" "$WORK/node" "*" "" 0  # the node's packages as installed: no deps
"${PIP[@]}" install -q --dry-run --no-index --ignore-installed --target "$WORK/t" "${TARGET[@]}" --find-links "$DIR" \
  --find-links "$WORK/node" --report "$WORK/check.json" -r "$WORK/node-reqs.txt" -r "$WORK/kv-reqs.txt"
# ... and the editable install's isolated build env, which sees DIR only
"${PIP[@]}" install -q --dry-run --no-index --ignore-installed --target "$WORK/t" "${TARGET[@]}" --find-links "$DIR" \
  "setuptools>=68" wheel
"$PY" - "$WORK/check.json" "$DIR/requirements.txt" <<'EOF'
import json, re, sys
got = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower() for i in json.load(open(sys.argv[1]))["install"]}
missing = [line for line in open(sys.argv[2]).read().split() if line.split("==")[0] not in got]
if missing:
    sys.exit(f"wheelhouse check: resolved set lacks {missing}")
EOF
echo "wheelhouse complete: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
echo "on the node (torch, triton, transformers installed; see $DIR/node-pins.txt):"
echo "  pip install --no-index --find-links ${1:-wheelhouse} -e '.[test]'"
