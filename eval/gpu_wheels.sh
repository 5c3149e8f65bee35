#!/usr/bin/env bash
# Fetches, on a machine with pip's registry, the wheels that eval/gpu_suite.sh installs on the
# device machine (Python 3.12, x86-64 Linux, no network there) into .whl/ (git-ignored through
# .git/info/exclude), so that a session lent a GPU spends its minutes measuring. Then:
#   run: STAGES="ours kernels flags profile" bash eval/gpu_suite.sh 540   (carry: [".whl"])
# Usage: bash eval/gpu_wheels.sh
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
diffusers=$(python3 -c 'import importlib.metadata as m; print(m.version("diffusers"))')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl "diffusers==$diffusers" importlib_metadata zipp \
    tokamax==0.0.17 einshape qwix immutabledict typeguard==2.13.3 jaxtyping wadler_lindig \
    pydantic pydantic-core annotated-types typing-inspection typing_extensions
du -sh .whl && ls .whl
