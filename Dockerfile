# dcgan-ray on Ray's own image of the pinned version, for KubeRay (cluster/kuberay.yaml) or any cluster
# that runs containers. From the checkout's root (README "Kubernetes"):
#   docker build -t REGISTRY/dcgan-ray:0.1.0-gpu .                          CUDA (PyPI's torch build)
#   docker build --build-arg VARIANT=cpu -t REGISTRY/dcgan-ray:0.1.0-cpu .  CPU only
# It installs requirements/runtime.lock hash-checked, torch at requirements/torch-version and the package,
# runs as Ray's non-root user `ray`, and holds no credentials: they come from the cluster (a Secret) at
# run time. tests/test_image.py checks what can be checked without Docker.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=gpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}
ARG VARIANT
# PyPI's torch for Linux x86-64 is the CUDA build; the CPU variant takes PyTorch's own CPU index.
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu

USER ray
WORKDIR /home/ray/dcgan-ray
COPY --chown=ray:users requirements/ requirements/
RUN case "$VARIANT" in \
      gpu) torch_index="" ;; \
      cpu) torch_index="--index-url $TORCH_INDEX_CPU" ;; \
      *) echo "VARIANT must be gpu or cpu, not $VARIANT" >&2; exit 2 ;; \
    esac \
 && pip install --no-cache-dir --require-hashes -r requirements/runtime.lock \
 && pip install --no-cache-dir $torch_index "torch==$(cat requirements/torch-version)"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dcgan_ray/ dcgan_ray/
COPY --chown=ray:users jobs/ jobs/
RUN pip install --no-cache-dir --no-deps -e . && pip check && python -c "import dcgan_ray.ray_internals"
