#!/bin/bash
# usage: run.sh IMAGE LABEL [extra shear args]
set -u
img=$1; label=$2; shift 2
d=/var/tmp/wtperf-rss/$label; rm -rf $d; mkdir -p $d/fl $d/run
qemu-system-x86_64 -S -accel tcg -nodefaults -display none -m 128 \
  -qmp unix:$d/qmp.sock,server=on,wait=off \
  -blockdev driver=qcow2,node-name=drv-d0,file.driver=file,file.filename=/var/tmp/wtperf-rss/$img \
  -device virtio-blk-pci,drive=drv-d0,id=d0 > $d/qemu.log 2>&1 &
qpid=$!
for i in $(seq 50); do [ -S $d/qmp.sock ] && break; sleep 0.1; done
S=/work/wt-perf/target/debug/shear
export SHEAR_RUN_DIR=$d/run SHEAR_CONFIG=$d/none.toml
$S --repo $d/repo init >/dev/null 2>&1
/usr/bin/time -v $S --repo $d/repo backup 100 --qmp $d/qmp.sock --qga $d/none.qga --fleecing-dir $d/fl --json "$@" > $d/out.json 2> $d/time.txt
echo "$label: rc=$? $(grep -E 'Maximum resident|Elapsed' $d/time.txt | tr -s ' ' | tr '\n' ' ')"
python3 -c "import json;r=json.load(open('$d/out.json'))[0];d=r.get('disks',[{}])[0];print('  read',d.get('bytes_read'),'stored',d.get('bytes_stored'),'fleece_peak',d.get('fleece_peak_bytes'),'released',d.get('bytes_released'),'err',r.get('error'))"
kill $qpid; wait $qpid 2>/dev/null
rm -rf $d/repo
