# The one papermail image: web (gunicorn), worker and beat (Celery), and the release step.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies change less often than the code: install them in their own layer.
COPY pyproject.toml README.md ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
RUN pip install -r /tmp/requirements.txt

COPY worker ./worker
COPY migrations ./migrations
COPY templates ./templates
# A regular (non-editable) install: migrations and templates are bundled into the package.
RUN pip install --no-deps . && useradd --create-home --uid 10001 papermail
USER papermail
WORKDIR /home/papermail

EXPOSE 8000
CMD ["gunicorn", "-c", "python:worker.web.gunicorn_conf", "worker.web:create_app()", "--bind", "0.0.0.0:8000", "--workers", "2"]
