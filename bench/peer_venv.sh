# Sourced by bench/vllm_cpu_env.sh and bench/llama_cpp_env.sh: the steps every peer venv takes around its own
# installs. Not run on its own.
#
# peer_venv_open VENV STAMP CHECK NAME: exits 0 when STAMP exists and `python -c CHECK` works in VENV; otherwise
#   makes VENV (if missing) with $PYTHON, upgrades its pip and sets PIP=(VENV's python -m pip) for the installs.
# peer_venv_close VENV STAMP CHECK NAME: runs CHECK (printing what it prints), writes STAMP, says it is ready.

peer_venv_open() {
    local venv="$1" stamp="$2" check="$3" name="$4"
    if [[ -f "$stamp" ]] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
        echo "$name venv ready: $venv"
        exit 0
    fi
    test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
    PIP=("$venv/bin/python" -m pip)
    "${PIP[@]}" install -q --upgrade pip
}

peer_venv_close() {
    local venv="$1" stamp="$2" check="$3" name="$4"
    "$venv/bin/python" -c "$check"
    touch "$stamp"
    echo "$name venv ready: $venv"
}
