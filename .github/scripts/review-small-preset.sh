#!/usr/bin/env bash
# Run the pipeline on the small preset at the base of a pull request and at its head, then
# write the review report (reports/review/review.md and review.html) for the head.
#
#   .github/scripts/review-small-preset.sh BASE_REVISION [DETAILS_URL]
#
# Both sides get the same small-preset data, so the review shows what the change does, not
# what the data size does. The base runs first and is committed on a throwaway local branch
# (<BASE_NAME>-small-preset); the head starts from the base run's dvc.lock and outputs, so
# only the stages the change affects run again. Needs a clean work tree and `make setup`;
# it switches revisions, so run it in CI or in a scratch clone. BASE_NAME and HEAD_NAME
# (optional) label the two sides.
set -euo pipefail

small_preset_run() {
  python -m pipelines.cli data generate --preset small
  dvc add -q data
  dvc repro
}

# Everything runs inside main(), which bash reads whole before starting: this file itself
# changes on disk when the script switches to the base revision.
main() {
  local base_ref=${1:?usage: $0 BASE_REVISION [DETAILS_URL]}
  local details_url=${2:-}
  cd "$(git rev-parse --show-toplevel)"
  if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "error: uncommitted changes in $(pwd); commit or stash them first (this script" \
      "switches revisions)" >&2
    exit 1
  fi

  export PATH="$PWD/.venv/bin:$PATH"
  export BENTOML_HOME="$PWD/.bentoml" BENTOML_DO_NOT_TRACK=True WHYLOGS_NO_ANALYTICS=True
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  git config user.email >/dev/null || git config user.email "review@localhost"
  git config user.name >/dev/null || git config user.name "review"

  local head base base_branch
  head=$(git rev-parse HEAD)
  base=$(git merge-base "$base_ref" "$head")
  base_branch="${BASE_NAME:-base}-small-preset"

  echo "== base $base (merge base of $base_ref and $head) on the small preset"
  git switch -q -C "$base_branch" "$base"
  small_preset_run
  git add -A -- . ":(exclude).venv" # a symlinked .venv is not matched by /.venv/ in .gitignore
  git commit -q --no-verify --allow-empty -m "Base of the review on the small preset (throwaway)"

  echo "== head $head on the small preset"
  if [[ -n "${HEAD_NAME:-}" ]]; then
    git switch -q -C "$HEAD_NAME" "$head"
  else
    git switch -q --detach "$head"
  fi
  # Start from the base run's dvc.lock: its outputs are still in the work tree (DVC outs
  # are git-ignored), so only the stages this change affects run again.
  git checkout "$base_branch" -- dvc.lock
  small_preset_run

  python -m pipelines.cli review --base "$base_branch" ${details_url:+--details-url "$details_url"}
}

main "$@"
exit
