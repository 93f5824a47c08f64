#!/usr/bin/env bash
# Fill a small tmpfs while committing and checking out, and check that every failure says why
# (no space, or git losing a write it reported done), that nothing half-done is visible
# (fsck clean, no reflog entry for a move that failed, no checkout folder left) and that the
# repository works once space is back. Needs root (it mounts a 400 KiB tmpfs) and git.
#   sudo bash scripts/disk-full-check.sh [path/to/coin]
set -u
COIN=$(realpath "${1:-target/debug/coin}")
MNT=$(mktemp -d)
WORK=$(mktemp -d)
trap 'cd /; umount "$MNT" 2>/dev/null; rm -rf "$MNT" "$WORK"' EXIT
mount -t tmpfs -o size=400k tmpfs "$MNT" || { echo "needs root to mount a tmpfs"; exit 2; }
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_CONFIG_GLOBAL=/dev/null
cd "$MNT" && git init -q r && cd r && "$COIN" init . >/dev/null
fail=0 ok=0
for k in 1 2 3 4 5 6 7 8 9 10; do
  rm -f "$MNT/filler"
  free=$(df -B1 --output=avail "$MNT" | tail -1)
  head -c $((free - k*4096)) /dev/zero > "$MNT/filler" 2>/dev/null
  mkdir -p "$WORK/s$k"; echo "tiny $k $RANDOM" > "$WORK/s$k/a.json"
  if out=$("$COIN" commit "$WORK/s$k" --task T -m "c$k" 2>&1); then
    ok=$((ok+1))
  else
    echo "k=$k: $out" | head -1
    case "$out" in
      *"No space left"*|*"probably full"*) ;;
      *) echo "FAIL: the error does not say the disk is full"; fail=1 ;;
    esac
  fi
  if "$COIN" checkout HEAD --output "$MNT/out$k" >/dev/null 2>&1; then rm -rf "$MNT/out$k"
  elif [ -e "$MNT/out$k" ]; then echo "FAIL: a failed checkout left $MNT/out$k"; fail=1; fi
done
rm -f "$MNT/filler"
"$COIN" fsck || fail=1
entries=$(git reflog show refs/coin/heads/main 2>/dev/null | wc -l)
[ "$entries" -eq "$ok" ] || { echo "FAIL: $entries reflog entries for $ok commits"; fail=1; }
mkdir -p "$WORK/last"; echo last > "$WORK/last/a.json"
"$COIN" commit "$WORK/last" --task T -m last >/dev/null || fail=1
"$COIN" fsck >/dev/null || fail=1
echo "$ok of 10 commits landed on the full disk; failures were clear: $([ $fail = 0 ] && echo yes || echo NO)"
exit $fail
