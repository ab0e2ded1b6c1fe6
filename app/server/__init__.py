"""Tailor's OpenAI-compatible HTTP server: many persona adapters on one base model, chosen per request.

The HTTP side only: FastAPI routes and wire formats (schemas), API-key checks (auth), body limits (limits), running
uvicorn in the foreground or on a thread (runner) and the client examples shown to users (snippets). Generation,
queueing and batching are app.core.serving's, so the same engine can be driven without HTTP.
"""
