"""The web UI of a grove (`engine ui`): a local Starlette app on 127.0.0.1.

`app` serves the pages, the JSON API and the live stream; `data` builds what they show from
the same result objects as `status --json`, `plan --json` and the event log; `actions`
runs every change through the engine's own command line. Needs the `ui` extra
(`pip install -e '.[ui]'` in a clone): starlette and uvicorn.
"""
