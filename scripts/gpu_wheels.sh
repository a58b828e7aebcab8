#!/usr/bin/env bash
# `make gpu-wheels`: the wheels that a GPU machine without network access needs to run the
# benchmarks, downloaded (or built, for packages published only as source) into a git-ignored
# folder that travels with the working tree. That machine's Python 3.12 (x86_64 Linux) already
# has torch, torchvision, numpy, h5py, pillow, matplotlib, tokenizers, safetensors, torchmetrics,
# httpx and more; it lacks the rest of our dependencies, or has them at versions ours do not work
# with (huggingface_hub 1.x where we need >=2.4). There, with the folder in the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/src
#
# Every wheel is at the version that constraints.txt pins (the tested versions), one version of
# each. Settings (environment variables; the Makefile passes them):
#   PYTHON                 the interpreter whose pip downloads and builds (python3)
#   WHEELS_DIR             where the wheels go (.whl)
#   WHEELS_PYTHON_VERSION  the target machine's Python, X.Y (3.12)
#   WHEELS_PACKAGES        names to fetch instead of the list below (space-separated)
#   WHEELS_CONSTRAINTS     the pins (constraints.txt)
# `scripts/gpu_wheels.sh --print` prints NAME==VERSION for each name and touches no network.
set -euo pipefail

# What the machine lacks. The install there is `--no-deps`, so each dependency of these that the
# machine does not have (or has at a version too old for them) is named here too. Relied on from
# the machine, not carried: pytorch-lightning (lightning's metadata names it), portalocker (iopath),
# opencv-python-headless (the cv2 of lvis), aiohttp (fsspec[http]), typer and click (transformers,
# uvicorn) and regex, tokenizers, safetensors and accelerate, whose versions there meet the floors
# of our transformers (the same as those of the transformers there, but for huggingface_hub).
DEFAULT_PACKAGES=(
    # SAM, the cache's shard format and the metrics
    segment-anything webdataset braceexpand pycocotools lvis hotcoco
    # the command line (settings dataclasses from flags and YAML, --help from docstrings)
    jsonargparse docstring_parser
    # SAM 2.1 and what it needs beyond torch (hydra's configs, iopath)
    sam2 hydra-core omegaconf antlr4-python3-runtime iopath
    # the machine's huggingface_hub is 1.x, ours is >=2.4, whose HTTP client is httpx2 (not httpx);
    # transformers and lightning are carried at our tested versions with it, so that they match
    huggingface_hub httpx2 httpcore2 truststore transformers lightning
    # the HTTP server (python -m regionspot_pl.serve): LitServe on FastAPI/uvicorn, none of which the
    # machine has (FastAPI imports opentelemetry-api); pydantic needs a typing_extensions newer than
    # some images hold
    litserve fastapi starlette uvicorn pyzmq opentelemetry-api pydantic pydantic_core annotated-types
    typing-inspection typing_extensions
)

PYTHON=${PYTHON:-python3}
WHEELS_DIR=${WHEELS_DIR:-.whl}
WHEELS_PYTHON_VERSION=${WHEELS_PYTHON_VERSION:-3.12}
WHEELS_CONSTRAINTS=${WHEELS_CONSTRAINTS:-constraints.txt}
if [[ -n "${WHEELS_PACKAGES:-}" ]]; then
    read -r -a PACKAGES <<<"$WHEELS_PACKAGES"
else
    PACKAGES=("${DEFAULT_PACKAGES[@]}")
fi

[[ "$WHEELS_PYTHON_VERSION" =~ ^3\.([0-9]+)$ ]] || {
    echo "gpu_wheels: WHEELS_PYTHON_VERSION must be 3.N, got '$WHEELS_PYTHON_VERSION'" >&2
    exit 2
}
MINOR=${BASH_REMATCH[1]}

# PEP 503 names: pins, wheel file names and the list may spell a name differently
# (docstring_parser / docstring-parser / docstring_parser-0.18.0-...whl).
shopt -s extglob
normalize() {
    local n=${1,,}
    echo "${n//+([-_.])/-}"
}

# The pins, {normalized name: version}, from the NAME==VERSION lines of the constraints file
# (comments and environment markers stripped), read in one pass.
declare -A PINNED
while read -r name version; do
    PINNED[$name]=$version
done < <(sed -E -e 's/[#;].*//' -e 's/[[:space:]]//g' "$WHEELS_CONSTRAINTS" |
    awk -F'==' 'NF == 2 { name = tolower($1); gsub(/[-_.]+/, "-", name); print name, $2 }')
pin_of() { echo "${PINNED[$(normalize "$1")]:-}"; }

# Resolve every pin before anything is fetched: a name without one fails the run, since an
# unpinned wheel would be whatever the registry has today, not the version the tests passed with.
declare -A PIN
missing=()
for name in "${PACKAGES[@]}"; do
    version=$(pin_of "$name")
    if [[ -z "$version" ]]; then
        missing+=("$name")
    else
        PIN[$name]=$version
    fi
done
if ((${#missing[@]})); then
    echo "gpu_wheels: no NAME==VERSION pin in $WHEELS_CONSTRAINTS for: ${missing[*]}" >&2
    echo "gpu_wheels: pin each (the version the tests pass with) before carrying it" >&2
    exit 1
fi

if [[ "${1:-}" == "--print" ]]; then
    for name in "${PACKAGES[@]}"; do echo "$name==${PIN[$name]}"; done
    exit 0
fi

# Whether a wheel file installs on CPython 3.MINOR on x86_64 manylinux: its Python tag is py3,
# py3MINOR or cp3MINOR, or cp3N with the stable ABI (abi3) for N <= MINOR; its platform is `any` or
# manylinux x86_64. (Compressed tag sets, e.g. manylinux2014_x86_64.manylinux_2_17_x86_64, count
# when one of them fits.)
wheel_fits() {
    local base=${1##*/} parts py abi plat tag ok_py=0 ok_plat=0
    base=${base%.whl}
    IFS=- read -r -a parts <<<"$base"
    local n=${#parts[@]}
    py=${parts[n - 3]} abi=${parts[n - 2]} plat=${parts[n - 1]}
    for tag in ${py//./ }; do
        if [[ "$tag" == py3 || "$tag" == "py3$MINOR" || "$tag" == "cp3$MINOR" ]]; then
            ok_py=1
        elif [[ "$abi" == abi3 && "$tag" =~ ^cp3([0-9]+)$ ]] && ((BASH_REMATCH[1] <= MINOR)); then
            ok_py=1
        fi
    done
    for tag in ${plat//./ }; do
        if [[ "$tag" == any || "$tag" =~ ^manylinux.*_x86_64$ ]]; then ok_plat=1; fi
    done
    ((ok_py && ok_plat))
}

# The wheel in WHEELS_DIR of a name at a version, if there is one.
have_wheel() {
    local want=$1 version=$2 f base
    for f in "$WHEELS_DIR"/*.whl; do
        [[ -e "$f" ]] || continue
        base=${f##*/}
        if [[ "$(normalize "${base%%-*}")" == "$want" ]]; then
            IFS=- read -r _ fver _ <<<"$base"
            if [[ "$fver" == "$version" ]] && wheel_fits "$f"; then
                echo "$f"
                return 0
            fi
        fi
    done
    return 0 # none: an empty answer, not a failure (which would end the script under set -e)
}

# Other versions (or wheels for another Python) of a name: removed, as two versions of one package
# stop the whole install on the machine.
drop_others() {
    local want=$1 version=$2 keep=$3 f base
    for f in "$WHEELS_DIR"/*.whl; do
        [[ -e "$f" && "$f" != "$keep" ]] || continue
        base=${f##*/}
        if [[ "$(normalize "${base%%-*}")" == "$want" ]]; then
            echo "gpu_wheels: removing $base (not $version for Python $WHEELS_PYTHON_VERSION)"
            rm -f -- "$f"
        fi
    done
}

# pip's --platform matches each tag exactly, so the common manylinux tags are named first and, for
# a package published only for a newer glibc, the others up to 2.39 (the machine's Python 3.12.3 is
# the one Ubuntu 24.04 ships, with glibc 2.39; a wheel for a newer glibc than the machine's would
# fail there at import). None of the list needs the second set today.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
MORE_PLATFORMS=()
for n in $(seq 39 -1 18); do
    if ((n != 28 && n != 27)); then MORE_PLATFORMS+=("manylinux_2_${n}_x86_64"); fi
done

download_binary() {
    local spec=$1 out=$2 p args=()
    shift 2
    for p in "$@"; do args+=(--platform "$p"); done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEELS_PYTHON_VERSION" \
        --implementation cp "${args[@]}" -d "$out" "$spec"
}

# A source-only package built into a wheel here. The result must be pure Python (py3-none-any or
# the like, no compiled file in it), since it was built for this machine's Python, not the target's.
# sam2's setup.py compiles a CUDA extension unless SAM2_BUILD_CUDA=0 (the extension serves only an
# optional mask post-processing) and its build requirements name torch: built without isolation,
# so that no torch is downloaded for a build that does not use it; the others in an isolated build.
build_sdist() {
    local name=$1 spec=$2 out=$3 isolation=()
    if [[ "$(normalize "$name")" == sam2 ]]; then isolation=(--no-build-isolation); fi
    SAM2_BUILD_CUDA=0 "$PYTHON" -m pip wheel -q --no-deps "${isolation[@]}" --no-binary "$name" -w "$out" "$spec"
}

has_compiled_code() {
    "$PYTHON" - "$1" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".dll")) or ".so." in n]
print("\n".join(compiled))
sys.exit(0 if compiled else 1)
EOF
}

mkdir -p "$WHEELS_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for name in "${PACKAGES[@]}"; do
    version=${PIN[$name]}
    spec="$name==$version"
    want=$(normalize "$name")
    found=$(have_wheel "$want" "$version")
    if [[ -n "$found" ]]; then
        echo "gpu_wheels: have ${found##*/}"
        drop_others "$want" "$version" "$found"
        continue
    fi
    out="$tmp/$want"
    mkdir -p "$out"
    if ! download_binary "$spec" "$out" "${PLATFORMS[@]}" 2>"$out.log" &&
        ! download_binary "$spec" "$out" "${PLATFORMS[@]}" "${MORE_PLATFORMS[@]}" 2>"$out.log"; then
        # no wheel for the target: a source distribution, built here
        echo "gpu_wheels: no wheel of $spec for cp3$MINOR manylinux x86_64; building it from source"
        if ! build_sdist "$name" "$spec" "$out" 2>>"$out.log"; then
            cat "$out.log" >&2
            echo "gpu_wheels: $spec: neither a wheel for Python $WHEELS_PYTHON_VERSION nor a source build" >&2
            exit 1
        fi
    fi
    wheels=("$out"/*.whl)
    if ((${#wheels[@]} != 1)) || [[ ! -e "${wheels[0]}" ]]; then
        echo "gpu_wheels: $spec gave ${#wheels[@]} files, not one wheel: ${wheels[*]##*/}" >&2
        exit 1
    fi
    wheel=${wheels[0]}
    if ! wheel_fits "$wheel"; then
        echo "gpu_wheels: ${wheel##*/} does not install on CPython $WHEELS_PYTHON_VERSION x86_64 manylinux" >&2
        exit 1
    fi
    if [[ "$wheel" == *-any.whl ]] && compiled=$(has_compiled_code "$wheel"); then
        echo "gpu_wheels: ${wheel##*/} is tagged pure Python but holds compiled code: $compiled" >&2
        exit 1
    fi
    mv "$wheel" "$WHEELS_DIR/"
    echo "gpu_wheels: got ${wheel##*/}"
    drop_others "$want" "$version" "$WHEELS_DIR/${wheel##*/}"
done

# Wheels of names outside the list stay (they may be there on purpose) but are named, since the
# install line installs every file in the folder.
declare -A LISTED
for name in "${PACKAGES[@]}"; do LISTED[$(normalize "$name")]=1; done
for f in "$WHEELS_DIR"/*.whl; do
    [[ -e "$f" ]] || continue
    base=${f##*/}
    [[ -n "${LISTED[$(normalize "${base%%-*}")]:-}" ]] || echo "gpu_wheels: note: $base is not in the list"
done
total=$(du -sk "$WHEELS_DIR" | cut -f1)
echo "gpu_wheels: $WHEELS_DIR holds $(ls "$WHEELS_DIR"/*.whl 2>/dev/null | wc -l) wheels, $((total / 1024)) MiB"
