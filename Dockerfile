# Image of the late observer: the Celery worker, Flower and the demo (docker-compose.yml).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY . .
# Flower is only a test extra in pyproject.toml; the image serves it too.
RUN pip install . "flower>=2.2" \
    && useradd --system --no-create-home --shell /usr/sbin/nologin observer
USER observer
# 8043: the worker's /metrics; 5555: Flower.
EXPOSE 8043 5555
CMD ["celery", "-A", "observer_tasks", "worker", "-Q", "late_obs"]
