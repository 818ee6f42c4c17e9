#!/usr/bin/env bash
# Check and apply megatron-switch's patches to a Megatron-LM checkout.
#   patches/apply.sh /path/to/Megatron-LM           apply the patch set that matches the tree
#   patches/apply.sh /path/to/Megatron-LM --check   only check (git apply --check), change nothing
# One directory per supported Megatron-LM tag (patches/core_vX.Y.Z/*.patch). A tree that no patch
# set matches is refused and left untouched; a tree that already has them is reported as such.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
tree="${1:-}"
mode="${2:-}"
if [ -z "$tree" ] || { [ -n "$mode" ] && [ "$mode" != "--check" ]; }; then
    echo "usage: $0 /path/to/Megatron-LM [--check]" >&2
    exit 2
fi
if [ ! -f "$tree/pretrain_gpt.py" ] || [ ! -d "$tree/megatron/training" ]; then
    echo "error: $tree is not a Megatron-LM checkout (no pretrain_gpt.py or megatron/training);" \
         "pass the root of https://github.com/NVIDIA/Megatron-LM" >&2
    exit 1
fi

info="$tree/megatron/core/package_info.py"
version="unknown"
if [ -f "$info" ]; then
    version="$(sed -n -E 's/^(MAJOR|MINOR|PATCH) *= *([0-9]+).*/\2/p' "$info" | paste -sd. -)"
fi

supported=()
for dir in "$here"/core_v*/; do supported+=("$(basename "$dir")"); done
# The set named after the tree's own version first, then the others.
order=()
[ -d "$here/core_v$version" ] && order+=("core_v$version")
for tag in "${supported[@]}"; do [ "$tag" = "core_v$version" ] || order+=("$tag"); done

for tag in "${order[@]}"; do
    dir="$here/$tag/"
    patches=("$dir"*.patch)
    if (cd "$tree" && git apply --check "${patches[@]}") 2>/dev/null; then
        if [ "$mode" = "--check" ]; then
            echo "ok: the $tag patches apply cleanly to $tree (megatron-core $version)"
        else
            (cd "$tree" && git apply "${patches[@]}")
            echo "applied the $tag patches to $tree (megatron-core $version):"
            for p in "${patches[@]}"; do echo "  $(basename "$p")"; done
        fi
        exit 0
    fi
    if (cd "$tree" && git apply --check --reverse "${patches[@]}") 2>/dev/null; then
        echo "ok: $tree already has the $tag patches"
        exit 0
    fi
done

echo "error: no megatron-switch patch set matches $tree (megatron-core $version)." >&2
echo "Supported Megatron-LM tags: ${supported[*]}. Check out one of them (git checkout core_v0.16.1)," >&2
echo "or run without patches: the entry points and --spec need none; only the pipeline-wide" >&2
echo "reduction of the Switch statistics in the training log does." >&2
exit 1
