#!/bin/bash
# Assemble the root filesystem of a final image that starts `FROM scratch` (docker/Dockerfile.gateway,
# docker/Dockerfile with ROOTFS=slim):
#
#   bash slim-rootfs.sh DEST PATH...
#
# Run in a stage of the same Debian as the base image, with the runtime packages installed (python3,
# tini, ca-certificates), the venv in place and the runtime user created. DEST receives only:
#   - the PATHs given (the venv, /data, extra executables), copied as they are;
#   - Debian's Python (/usr/bin/python3: the interpreter and the standard library with its bytecode,
#     minus what a server never imports: test suite, pydoc topics, distutils, lib2to3, ensurepip,
#     Tk, IDLE);
#   - tini, a POSIX shell (dash) and the tools of coreutils, grep, sed and findutils, for health
#     checks and `docker exec` debugging;
#   - every shared library that any ELF file copied links against (ldd), plus libgcc_s, which glibc
#     loads at run time when a thread exits;
#   - CA certificates, /etc/passwd and /etc/group (the runtime user), nsswitch.conf, os-release;
#   - ldconfig and the library cache, which ctypes.util.find_library reads.
# Nothing else: no apt, dpkg, perl, bash, docs, man pages, locales, iconv modules or time zones.
# The build fails if any ELF file has a library that cannot be found.
set -euo pipefail
dest="$(realpath -m "$1")"; shift
mkdir -p "$dest"
cd /

copy() {  # copy PATH...: each path (and, for a symlink, the chain it points through) under $dest
  local path target
  for path in "$@"; do
    [ -e "$path" ] || [ -L "$path" ] || { echo "slim-rootfs: missing $path" >&2; exit 1; }
    # /lib/x86_64-linux-gnu/libc.so.6 is copied as /usr/lib/...: the directory, not the file, resolved.
    path="$(readlink -f "$(dirname "$path")")/$(basename "$path")"
    [ -e "$dest$path" ] || [ -L "$dest$path" ] || cp -a --parents "$path" "$dest"
    if [ -L "$path" ]; then
      target="$(readlink "$path")"
      case "$target" in /*) ;; *) target="$(dirname "$path")/$target";; esac
      copy "$target"
    fi
  done
}

# Merged /usr: /bin, /lib, /lib64 and /sbin are symlinks into /usr, and stay so.
for top in bin lib lib64 sbin; do
  if [ -L "/$top" ]; then cp -P "/$top" "$dest/$top"; fi
done

# The given paths, Python, tini, the shell and its tools.
copy "$@"
python="$(readlink -f /usr/bin/python3)"  # /usr/bin/python3.11 on bookworm
copy /usr/bin/python3 "$python" /usr/bin/tini /bin/sh /usr/bin/dash
if [ -e "/etc/$(basename "$python")" ]; then copy "/etc/$(basename "$python")"; fi  # sitecustomize.py
stdlib="$(/usr/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
mkdir -p "$dest$stdlib"
tar -C "$stdlib" -c \
  --exclude=./test --exclude=./pydoc_data --exclude=./distutils --exclude=./lib2to3 \
  --exclude=./ensurepip --exclude=./tkinter --exclude=./idlelib --exclude=./turtledemo \
  --exclude='./config-*' . | tar -C "$dest$stdlib" -x
for package in coreutils grep sed findutils; do
  dpkg-query -L "$package" | grep -E '^/(usr/)?s?bin/.' | while read -r tool; do
    [ -d "$tool" ] || copy "$tool"
  done
done

# Certificates and the few files of /etc a process looks at.
for path in /etc/ssl /usr/lib/ssl /usr/share/ca-certificates /etc/passwd /etc/group /etc/nsswitch.conf \
            /etc/os-release /usr/lib/os-release /etc/mime.types; do
  if [ -e "$path" ] || [ -L "$path" ]; then copy "$path"; fi
done
copy "$(dpkg-query -L libgcc-s1 | grep '/libgcc_s\.so\.1$' | head -n1)"

# Shared libraries: ldd of every ELF file in $dest, until nothing new turns up.
missing=0
while :; do
  before="$(find "$dest" -xtype f | wc -l)"
  while read -r file; do
    [ "$(head -c 4 "$file" | od -An -c | tr -d ' ')" = '177ELF' ] || continue
    out="$(ldd "$file" 2>/dev/null || true)"
    if echo "$out" | grep -q 'not found'; then
      echo "slim-rootfs: $file: $(echo "$out" | grep 'not found' | tr -s ' \t' ' ')" >&2; missing=1
    fi
    for lib in $(echo "$out" | sed -n -e 's/.*=> \(\/[^ ]*\) .*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
      copy "$lib"
    done
  done < <(find "$dest" -type f \( -perm -u+x -o -name '*.so' -o -name '*.so.*' \))
  [ "$(find "$dest" -xtype f | wc -l)" = "$before" ] && break
done
[ "$missing" = 0 ]

# ldconfig and its cache: ctypes.util.find_library (Twisted's inotify, which watches the key file)
# runs `ldconfig -p` to find libc.
copy /sbin/ldconfig /etc/ld.so.conf /etc/ld.so.conf.d
ldconfig -r "$dest"

# Mount points and the writable places a container expects.
mkdir -p "$dest/proc" "$dest/sys" "$dest/dev" "$dest/run" "$dest/tmp" "$dest/var/tmp"
chmod 1777 "$dest/tmp" "$dest/var/tmp"
for file in hosts hostname resolv.conf; do : > "$dest/etc/$file"; done
