FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY libs libs
COPY services services
COPY cli cli
COPY examples examples
RUN pip install --no-cache-dir .
ENTRYPOINT ["petribus"]
