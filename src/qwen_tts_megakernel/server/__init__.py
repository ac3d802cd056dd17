"""The streaming TTS server (FastAPI on uvicorn): `qwen-tts-mk serve`. Needs the `server` extra."""
