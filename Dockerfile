# Backend and worker image. CPU torch by default; for a GPU worker build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 MODEL_DIR=/data/models
WORKDIR /app
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY ml_backend ./ml_backend
COPY scripts ./scripts
COPY label_config ./label_config
RUN pip install --no-cache-dir .
EXPOSE 9090
CMD ["gunicorn", "--bind", "0.0.0.0:9090", "--workers", "1", "--threads", "4", "--timeout", "300", "ml_backend.server.app:create_app()"]
