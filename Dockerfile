# wx-gateway container image. Build, run and configure: docs/deployment-container.md.
#
# Only this first FROM names a public image. Machines that reach no image registry
# build with `podman build --from <a local Debian python3 image>`, which replaces
# exactly this line, so every later stage derives from it and nothing below depends
# on where Python lives: `python3` from PATH and a virtualenv in /opt/venv.
FROM python:3.12-slim AS base
# PATH is spelled out rather than extended: a base imported from a root file system
# carries no environment at all, and `$PATH` would then expand to nothing.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1

# --- build: the package and its dependencies in a virtualenv; only the venv is kept.
FROM base AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first, read from pyproject.toml alone, so this layer is reused until
# they change. Wheels only: the image needs no compiler, and a platform without a
# wheel fails here with a clear message instead of halfway through a C build.
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install --only-binary=:all: -r requirements.txt
COPY setup.py build_backend.py ./
COPY gateway ./gateway
# A regular (non-editable) install; then the installer itself goes, it has no use at run time.
RUN pip install --no-deps . \
 && pip uninstall -y pip setuptools wheel

# --- runtime
FROM base
RUN groupadd --system --gid 10001 wxgateway \
 && useradd --system --uid 10001 --gid wxgateway --no-create-home \
        --home-dir /var/lib/wx-gateway --shell /usr/sbin/nologin wxgateway \
 && install -d -o wxgateway -g wxgateway -m 0750 /var/lib/wx-gateway
COPY --from=build /opt/venv /opt/venv
# The shipped config.yaml (fake WeChat, development token key) is the default; mount
# your own file over it. Every value it reads from ${VAR:-default} can be set with -e.
COPY config.yaml /etc/wx-gateway/config.yaml
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_STORAGE_URL=sqlite:////var/lib/wx-gateway/gateway.db \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/var/lib/wx-gateway"]
WORKDIR /var/lib/wx-gateway
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# Slim images carry no curl. The port follows GATEWAY_PORT, as the shipped config does.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8080'), timeout=4)"]
CMD ["gateway", "run", "-c", "/etc/wx-gateway/config.yaml"]
