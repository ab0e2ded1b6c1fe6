#!/bin/sh
# Add Tailor to the application menu of the current user. Run it from the unpacked folder (where tailor-gui is);
# run it again after moving the folder.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
data="${XDG_DATA_HOME:-$HOME/.local/share}"
mkdir -p "$data/applications" "$data/icons/hicolor/scalable/apps"
cp "$here/_internal/resources/icons/tailor.svg" "$data/icons/hicolor/scalable/apps/tailor.svg"
sed -e "s|^Exec=.*|Exec=\"$here/tailor-gui\"|" -e "s|^TryExec=.*|TryExec=$here/tailor-gui|" \
    "$here/tailor.desktop" > "$data/applications/tailor.desktop"
echo "Tailor is now in the application menu ($data/applications/tailor.desktop)."
