"""A ComfyUI-style client (requests): POST /prompt, poll /history/{id}, GET /view. Runs unchanged against ComfyUI.

    python docs/api/comfy_client.py --workflow docs/api/text_to_image.json --out out/
"""

import argparse
import json
import os
import time
import uuid

import requests


def queue_prompt(server, prompt, client_id, headers):
    r = requests.post(f"{server}/prompt", json={"prompt": prompt, "client_id": client_id}, headers=headers)
    if r.status_code != 200:
        raise SystemExit(f"refused ({r.status_code}): {json.dumps(r.json(), indent=1)}")
    return r.json()["prompt_id"]


def wait_history(server, prompt_id, headers, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = requests.get(f"{server}/history/{prompt_id}", headers=headers).json()
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.25)
    raise SystemExit(f"{prompt_id} did not finish in {timeout} s")


def get_image(server, image, headers):
    r = requests.get(f"{server}/view", params=image, headers=headers)
    r.raise_for_status()
    return r.content


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--workflow", required=True, help="ComfyUI 'Save (API format)' JSON")
    p.add_argument("--out", default=".")
    p.add_argument("--token", default=os.environ.get("EDGEGEN_TOKEN"), help="only for a server bound beyond loopback")
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with open(args.workflow) as f:
        prompt = json.load(f)
    prompt_id = queue_prompt(args.server, prompt, str(uuid.uuid4()), headers)
    entry = wait_history(args.server, prompt_id, headers)
    if not entry["status"]["completed"]:
        raise SystemExit(f"failed: {entry['status']['messages'][-1]}")
    os.makedirs(args.out, exist_ok=True)
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            path = os.path.join(args.out, image["filename"])
            with open(path, "wb") as f:
                f.write(get_image(args.server, image, headers))
            print(path)


if __name__ == "__main__":
    main()
