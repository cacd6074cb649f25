#!/bin/sh
# Trim the image's virtualenv (run in the builder stages of docker/Dockerfile*, on /opt/venv):
# no installer (pip, setuptools), no test suites of any package, and none of Twisted's protocols the
# gateway never loads (SSH, mail, IRC/words, pair, positioning) nor their twistd plugins and
# scripts. scripts/test-docker.sh checks the result: the gateway starts, serves and shuts down.
set -eu
venv="${1:-/opt/venv}"
"$venv/bin/python" -m pip uninstall --quiet -y pip setuptools
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
find "$site" -depth -type d \( -name test -o -name tests \) -exec rm -rf {} +
for package in conch mail words pair positioning; do
  rm -rf "$site/twisted/$package"
done
for plugin in twisted_conch twisted_mail twisted_words cred_sshkeys; do
  rm -f "$site/twisted/plugins/$plugin.py" "$site/twisted/plugins/__pycache__/$plugin".*.pyc
done
rm -f "$venv/bin/conch" "$venv/bin/cftp" "$venv/bin/ckeygen" "$venv/bin/tkconch" "$venv/bin/mailmail"
