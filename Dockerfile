# dcgan-ray on Ray's own image of the pinned version, for KubeRay (cluster/kuberay.yaml) or any cluster that runs
# containers. Two variants from this one file, both on Ray's CPU image, which carries no CUDA of its own:
#   VARIANT=gpu  PyPI's CUDA build of torch with the CUDA runtime it brings (nvidia-* wheels): the image's one
#                CUDA; the node's NVIDIA driver comes in through the container runtime. For the GPU workers.
#   VARIANT=cpu  PyTorch's CPU build, without CUDA. For the head and the submitter, which train nothing.
# From the checkout's root (cluster/README.md "The image"):
#   TAG="$(bash scripts/image-tag.sh)"                 the version and a digest of this file and the locks
#   docker build --build-arg VARIANT=gpu -t REGISTRY/dcgan-ray:$TAG-gpu .
#   docker build --build-arg VARIANT=cpu -t REGISTRY/dcgan-ray:$TAG-cpu .
# Layers from the least to the most often changed: torch alone (requirements/torch-VARIANT.lock), the locked
# dependencies (requirements/runtime.lock), the package; every install hash-checked. Ray's user `ray` runs every
# step and owns every folder written to: the classic builder, kaniko and older buildah make a WORKDIR as root,
# so the folder is made first, by `ray`. It holds no credentials: they come from the cluster at run time.
# tests/test_image.py checks what can be checked without Docker.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu
ARG VARIANT=gpu
# What the NVIDIA container runtime mounts of the node's driver (NVIDIA's CUDA images set the same); without a
# GPU it does nothing.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER ray
RUN case "$VARIANT" in gpu|cpu) ;; *) echo "VARIANT must be gpu or cpu, not $VARIANT" >&2; exit 2 ;; esac \
 && mkdir -p /home/ray/dcgan-ray /home/ray/dcgan-ray/requirements /home/ray/dcgan-ray/scripts \
    /home/ray/dcgan-ray/dcgan_ray /home/ray/dcgan-ray/jobs
WORKDIR /home/ray/dcgan-ray
# torch in a layer of its own: a change of runtime.lock neither rebuilds nor re-pushes its gigabytes.
COPY --chown=ray:users requirements/torch-${VARIANT}.lock requirements/
RUN pip install --no-cache-dir --no-deps --require-hashes -r requirements/torch-${VARIANT}.lock
COPY --chown=ray:users requirements/runtime.lock requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/runtime.lock
COPY --chown=ray:users scripts/check_installed.py scripts/
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dcgan_ray/ dcgan_ray/
COPY --chown=ray:users jobs/ jobs/
# `pip check` for what the locks installed (Ray's image has packages of its own, not ours to check).
RUN pip install --no-cache-dir --no-deps -e . \
 && python scripts/check_installed.py requirements/runtime.lock requirements/torch-${VARIANT}.lock --package dcgan-ray \
 && python -c "import dcgan_ray.ray_internals"
