# One image for every Belfry service: `belfry serve <name>` starts any of them,
# `belfry migrate` applies the schema (the migration Job).
#
# Build stage: a virtual environment with Belfry and its dependencies. Every
# dependency ships manylinux wheels except http-ece, a pure-Python source
# package, so no compiler is installed at all (a dependency that needed one
# would fail the build here rather than pull one in).
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
RUN python -m venv /opt/belfry
COPY pyproject.toml README.md ./
# The code, generated gRPC modules (libs/belfry/api) and migrations included.
COPY libs ./libs
COPY services ./services
# A regular install (pip compiles the bytecode): the packages and their data
# (migrations, catalogue, templates, the web app) land in the virtual
# environment, where belfry.migrate finds the migrations with
# importlib.resources, so the source tree stays behind in this stage. No
# extras: the local one (belfry up's embedded PostgreSQL and mail catcher)
# is development tooling, and no service imports it.
RUN /opt/belfry/bin/pip install ./ \
    && /opt/belfry/bin/belfry --help >/dev/null

# Run stage: the interpreter and the virtual environment; no pip, no build
# tools, no root.
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="belfry" \
      org.opencontainers.image.description="Belfry notification services (belfry serve <name>)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/belfry/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BELFRY_LOG_JSON=true

# Drop pip and setuptools from the base image: nothing installs at run time.
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 belfry \
    && useradd --system --uid 10001 --gid belfry --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin belfry

COPY --from=build /opt/belfry /opt/belfry
RUN rm -f /opt/belfry/bin/pip /opt/belfry/bin/pip3 /opt/belfry/bin/pip3.11 \
    && rm -rf /opt/belfry/lib/python3.11/site-packages/pip

# Numeric user so Kubernetes can verify runAsNonRoot without resolving names.
USER 10001:10001
# 50051-50058: gRPC (one per service); 8080: gateway HTTP; 9464: Prometheus metrics.
EXPOSE 50051 50052 50053 50054 50055 50056 50057 50058 8080 9464
ENTRYPOINT ["belfry"]
CMD ["serve", "--help"]
